"""The transfer study's reports: per-run table, per-arm means with 95% intervals, paired comparisons, plots.

An arm is a recipe at an adapter learning rate (`arm(row)`, e.g. 'layerwise lr=1e-3'). Every
figure over seeds is a mean with its Student's t interval (scripts/intervals.py), and a floor
counts as kept only when the interval's lower end keeps it. `compare` pairs two arms seed by seed:
they trained on the same batches and were scored on the same items, so the interval of the
per-seed difference is the one to choose a default by (two overlapping intervals of three seeds
each say little; their paired difference can still be clear).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from scripts.intervals import fmt, interval, kept

FLOORS = {"accuracy": 0.03, "perplexity": 1.3}  # privacy margin: 3 points, or 1.3x
EMULATOR_FLOOR = 3.0  # the emulator alone at least 3x the full model's perplexity
DERIVED = ("gap_closed", "privacy_margin", "plug_in", "emulator_finetuned", "emulator_zero_shot",
           "full_zero_shot", "full_finetuned")  # fmt: skip


def lr_text(lr: float) -> str:
    """A learning rate as '1e-3', '3e-4'."""
    mantissa, exponent = f"{lr:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def arm(r: dict) -> str:
    """A row's arm: its recipe and the adapter's learning rate."""
    return f"{r['recipe']} lr={lr_text(r['learning_rate'])}"


def budget(r: dict) -> str:
    """A row's training budget, e.g. '40x4x128'."""
    block = r.get("block_size") or (128 if r["metric"] == "perplexity" else 256)
    return f"{r['steps']}x{r.get('batch_size', 4)}x{block}"


def read_rows(files: list[str], error) -> list[dict]:
    """The rows of earlier runs' rows.jsonl files; `error` (argparse's) on an unreadable one."""
    rows = []
    for f in files:
        try:
            rows += [json.loads(line) for line in Path(f).read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as e:
            error(
                f"--from-rows {f}: not a readable rows.jsonl ({e}); give a transfer study's OUT/rows.jsonl"
            )
    return rows


def table(rows: list[dict]) -> str:
    """Every run, one line each."""
    head = "| task | arm | seed | build s | transfer score | emulator zero-shot | emulator fine-tuned | plug-in | full zero-shot | full fine-tuned | gap closed | privacy margin |"
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        acc = r["metric"] == "accuracy"
        f = (lambda v: f"{100 * v:.1f}%") if acc else (lambda v: f"{v:.2f}")
        margin = f"{100 * r['privacy_margin']:+.1f} pts" if acc else f"{r['privacy_margin']:.2f}x"
        lines.append(f"| {r['task']} | {arm(r)} | {r.get('seed', '-')} | {r['build_s']:.0f} | {r['transfer']['mean']:.3f} | "
                     f"{f(r['emulator_zero_shot'])} | {f(r['emulator_finetuned'])} | {f(r['plug_in'])} | "
                     f"{f(r['full_zero_shot'])} | {f(r['full_finetuned'])} | {100 * r['gap_closed']:.0f}% | {margin} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per task x arm x budget: mean and 95% interval over its seeds, floors by the interval."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], arm(r), budget(r))].append(r)
    out = []
    for (task, name, b), sub in sorted(groups.items()):
        acc = sub[0]["metric"] == "accuracy"
        ivs = {k: interval([r[k] for r in sub if r.get(k) is not None]) for k in DERIVED}
        emu_ratio = (
            None if acc else interval([r["emulator_zero_shot"] / r["full_zero_shot"] for r in sub])
        )
        out.append({"task": task, "arm": name, "recipe": sub[0]["recipe"], "learning_rate": sub[0]["learning_rate"],
                    "budget": b, "metric": sub[0]["metric"], "seeds": sorted(r.get("seed") for r in sub), **ivs,
                    "emulator_over_full": emu_ratio, "margin_floor": FLOORS[sub[0]["metric"]],
                    "margin_kept": kept(ivs["privacy_margin"], FLOORS[sub[0]["metric"]]),
                    "emulator_floor_kept": None if emu_ratio is None else kept(emu_ratio, EMULATOR_FLOOR),
                    "run_s": interval([r.get("run_s", 0.0) for r in sub])["mean"]})  # fmt: skip
    return out


def compare(rows: list[dict], references: list[str]) -> list[dict]:
    """Each arm minus each reference arm, seed by seed, on the tasks and budgets both ran: the
    mean difference of the plug-in, the gap closed and the privacy margin with 95% intervals."""
    by: dict[tuple, dict] = {(r["task"], budget(r), arm(r), r.get("seed")): r for r in rows}
    out = []
    for reference in references:
        out += _paired(by, reference)
    return out


def _paired(by: dict[tuple, dict], reference: str) -> list[dict]:
    out = []
    for task, b, name in sorted({(t, bb, a) for t, bb, a, _ in by if a != reference}):
        pairs = [(by[k], by[(task, b, reference, k[3])]) for k in by
                 if k[:3] == (task, b, name) and (task, b, reference, k[3]) in by]  # fmt: skip
        if not pairs:
            continue
        diff = {key: interval([r[key] - ref[key] for r, ref in pairs])
                for key in ("plug_in", "gap_closed", "privacy_margin")}  # fmt: skip
        out.append({"task": task, "budget": b, "arm": name, "reference": reference, "metric": pairs[0][0]["metric"],
                    "seeds": sorted(r.get("seed") for r, _ in pairs), **diff})  # fmt: skip
    return out


_YES = {True: "yes", False: "**no**", None: "n=1"}


def _value_fmt(metric: str):
    return (lambda iv: fmt(iv, 100, 1, "%")) if metric == "accuracy" else (lambda iv: fmt(iv, 1, 2))


def _margin_fmt(iv: dict, metric: str) -> str:
    return fmt(iv, 100, 1, " pts") if metric == "accuracy" else fmt(iv, 1, 2, "x")


def summary_table(summary: list[dict]) -> str:
    head = ("| task | arm | budget | seeds | full zero-shot | emulator fine-tuned | plug-in | full fine-tuned | "
            "gap closed | privacy margin | margin floor kept | emulator alone / full |")  # fmt: skip
    lines = [head, "|" + "---|" * 12]
    for s in summary:
        v = _value_fmt(s["metric"])
        ratio = "-" if s["emulator_over_full"] is None else fmt(s["emulator_over_full"], 1, 1, "x")
        lines.append(f"| {s['task']} | {s['arm']} | {s['budget']} | {','.join(map(str, s['seeds']))} | "
                     f"{v(s['full_zero_shot'])} | {v(s['emulator_finetuned'])} | {v(s['plug_in'])} | "
                     f"{v(s['full_finetuned'])} | {fmt(s['gap_closed'], 100, 0, '%')} | "
                     f"{_margin_fmt(s['privacy_margin'], s['metric'])} | {_YES[s['margin_kept']]} | {ratio} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def compare_table(pairs: list[dict]) -> str:
    """Paired differences: a difference is clear when its interval leaves out zero."""
    head = "| task | budget | arm | minus | seeds | plug-in | gap closed | privacy margin |"
    lines = [head, "|" + "---|" * 8]
    for p in pairs:
        acc = p["metric"] == "accuracy"
        pts = lambda iv: fmt(iv, 100, 1, " pts", signed=True)  # noqa: E731
        plug = pts(p["plug_in"]) if acc else fmt(p["plug_in"], 1, 2, signed=True)
        margin = pts(p["privacy_margin"]) if acc else fmt(p["privacy_margin"], 1, 3, signed=True)
        lines.append(f"| {p['task']} | {p['budget']} | {p['arm']} | {p['reference']} | {','.join(map(str, p['seeds']))} | "
                     f"{plug} | {pts(p['gap_closed'])} | {margin} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _panels(items: list[dict], path: Path, draw, goal: int, title: str) -> None:
    """One panel per task of gap closed against privacy margin; `draw(ax, items, scale)` its points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in items})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4.2), squeeze=False)
    for ax, name in zip(axes[0], tasks, strict=True):
        sub = [r for r in items if r["task"] == name]
        acc = sub[0]["metric"] == "accuracy"
        draw(ax, sub, 100 if acc else 1)
        ax.axhline(3 if acc else 1.3, color="grey", linestyle=":", label="privacy floor")
        ax.axvline(goal, color="green", linestyle=":", label=f"{goal}% of the gap")
        ax.set_title(f"{name}{title}")
        ax.set_xlabel("gap closed by the plug-in (%)")
        ax.set_ylabel(
            "privacy margin (points)" if acc else "privacy margin (emulator fine-tuned / plug-in)"
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(rows: list[dict], path: Path) -> None:
    """Gap closed against privacy margin, one point per run: the frontier to choose on."""

    def draw(ax, sub, scale):
        for r in sub:
            ax.scatter(100 * r["gap_closed"], scale * r["privacy_margin"])
            ax.annotate(arm(r), (100 * r["gap_closed"], scale * r["privacy_margin"]), fontsize=7)

    _panels(rows, path, draw, 80, "")


def _err(iv: dict, k: float) -> list | None:
    """A matplotlib error bar for interval `iv` scaled by `k` (None with a single run)."""
    if iv["low"] is None:
        return None
    return [[k * (iv["mean"] - iv["low"])], [k * (iv["high"] - iv["mean"])]]


def plot_summary(summary: list[dict], path: Path) -> None:
    """Gap closed against privacy margin with 95% intervals, one point per arm x budget."""

    def draw(ax, sub, scale):
        for s in sub:
            g, m = s["gap_closed"], s["privacy_margin"]
            ax.errorbar(100 * g["mean"], scale * m["mean"], xerr=_err(g, 100), yerr=_err(m, scale),
                        fmt="o", capsize=3, label=f"{s['arm']} {s['budget']}")  # fmt: skip

    _panels(summary, path, draw, 90, " (mean and 95% interval over seeds)")


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Rank correlation of two lists (no ties expected), None below three points."""
    if len(xs) < 3:
        return None

    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else None


def report(rows: list[dict], out: Path, references: list[str]) -> None:
    """OUT/table.md (every run), OUT/summary.{md,json,png} (over seeds) and OUT/compare.md (paired
    against each of `references`), printed too."""
    (out / "table.md").write_text(table(rows))
    plot(rows, out / "frontier.png")
    summary, pairs = summarize(rows), compare(rows, references)
    (out / "summary.md").write_text(summary_table(summary))
    (out / "summary.json").write_text(
        json.dumps({"arms": summary, "paired": pairs}, indent=1) + "\n"
    )
    (out / "compare.md").write_text(compare_table(pairs))
    plot_summary(summary, out / "summary.png")
    print(table(rows))
    print(summary_table(summary))
    print(compare_table(pairs))
    for name in sorted({r["task"] for r in rows}):
        sub = [r for r in rows if r["task"] == name]
        rho = spearman([r["transfer"]["mean"] for r in sub], [r["gap_closed"] for r in sub])
        print(f"{name}: Spearman(transfer score, gap closed) = {rho}")
