"""Transfer study: which emulator recipe and adapter placement make the plug-in, not the data owner, gain.

    python -m scripts.transfer_study --recipes drop layerwise layerwise-teacher \\
        --task shakespeare --task sst2 --task arc-easy --data-root ../shared/data --out runs/transfer

A recipe is a YAML file (`StudyRecipe`): `adapter_bottom`, `adapter_top`, `emulator_layers` (the
split) and `recipe`, an `EmulatorRecipe` as `owner package-emulator --recipe` reads it. A bare
NAME is a built-in one, scripts/recipes/NAME.yaml (drop, layerwise, layerwise-teacher, harmonizer); a row is
named by the file's stem. Each recipe's emulator is built once
(timed), scored by the owner-side transfer score, then run through the five settings on every
task with the same batches; the full-model ceiling is measured once per task. Writes
OUT/rows.jsonl (one row per recipe and task, appended as they finish), OUT/table.md, and prints
the Spearman rank correlation between the transfer score and the gap closed. `--seeds 0 1 2` runs
every recipe x task once per seed (the batch order of every setting and the task's sample of items);
OUT/summary.md then gives each recipe x task's mean and 95% interval of the gap closed and the
privacy margin, and a floor counts as kept only when the interval's lower end keeps it. The
full-model ceiling of each task and seed is kept in OUT/ceilings.json, so later runs into the same
OUT (another recipe) reuse it. `--from-rows` tables and plots earlier runs' rows together without
building anything.

The realistic budget (README "Utility figures"):

    python -m scripts.transfer_study --recipes layerwise --task tinyshakespeare --task sst2 \
        --task arc-easy --task agnews --data-root ../shared/data --seeds 0 1 2 --steps 200 \
        --block-size 256 --eval-limit 1000 --mixed-precision bf16 --out runs/realistic
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from offsite.emulator.plan import make_plan
from offsite.emulator.recipe import PUBLIC_SAMPLE, EmulatorRecipe, make_emulator
from offsite.emulator.transfer import transfer_score
from offsite.errors import OffsiteError
from offsite.evaluation.five_settings import evaluate_offsite
from offsite.evaluation.specs import data_root, load_task
from offsite.evaluation.tasks import PerplexityTask, build_task
from offsite.models.architectures import num_blocks
from offsite.models.loading import load_model, load_tokenizer
from offsite.settings import load_yaml
from offsite.training.config import PRECISIONS, TrainConfig
from offsite.training.data import load_data, pad_id_of
from scripts.intervals import fmt, interval, kept

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


RECIPES = Path(__file__).resolve().parent / "recipes"


@dataclass(frozen=True)
class StudyRecipe:
    """One arm of the study, as a YAML file: the split and how the emulator is made."""

    adapter_bottom: int = 2
    adapter_top: int = 2
    emulator_layers: int | None = None  # middle blocks kept (default half)
    recipe: EmulatorRecipe = field(default_factory=EmulatorRecipe)


def load_recipes(names: list[str]) -> dict[str, StudyRecipe]:
    """Each recipe by its row name: NAME is scripts/recipes/NAME.yaml, a path FILE.yaml its stem."""
    out = {}
    for name in names:
        path = Path(name) if name.endswith(".yaml") else RECIPES / f"{name}.yaml"
        if not path.is_file() and not name.endswith(".yaml"):
            known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
            raise OffsiteError(
                f"recipe {name!r}: no such built-in recipe ({known}); or give a FILE.yaml"
            )
        out[path.stem] = load_yaml(StudyRecipe, path)
    return out


def build(full, tok, arm: StudyRecipe) -> tuple:
    """(emulator, plan, record, seconds) for one recipe."""
    plan = make_plan(num_blocks(full.config), adapter_bottom=arm.adapter_bottom, adapter_top=arm.adapter_top,
                     emulator_layers=arm.emulator_layers)  # fmt: skip
    t0 = time.perf_counter()
    emulator, plan, record = make_emulator(full, tok, plan, arm.recipe)
    return emulator, plan, record, time.perf_counter() - t0


def tasks_for(
    names: list[str],
    root: str | None,
    block_size: int | None,
    eval_limit: int,
    train_limit: int,
    seed: int = 42,
) -> list:
    """The tasks by name; `seed` samples the items of choice tasks (and splits files without a test)."""
    out = []
    for n in names:
        if n == "shakespeare":
            out.append(
                PerplexityTask.from_files(
                    SAMPLES / "shakespeare-train.txt",
                    SAMPLES / "shakespeare-test.txt",
                    block_size or 128,
                    48 * 128 // (block_size or 128),
                )
            )
        else:
            out.append(build_task(load_task(n), data_root(root), block_size=block_size, eval_limit=eval_limit,
                                  train_limit=train_limit, seed=seed))  # fmt: skip
    return out


def spearman(xs: list[float], ys: list[float]) -> float | None:
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


def table(rows: list[dict]) -> str:
    head = "| task | recipe | build s | transfer score | emulator zero-shot | emulator fine-tuned | plug-in | full zero-shot | full fine-tuned | gap closed | privacy margin |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        acc = r["metric"] == "accuracy"
        f = (lambda v: f"{100 * v:.1f}%") if acc else (lambda v: f"{v:.2f}")
        margin = f"{100 * r['privacy_margin']:+.1f} pts" if acc else f"{r['privacy_margin']:.2f}x"
        lines.append(f"| {r['task']} | {r['recipe']} | {r['build_s']:.0f} | {r['transfer']['mean']:.3f} | {f(r['emulator_zero_shot'])} | "
                     f"{f(r['emulator_finetuned'])} | {f(r['plug_in'])} | {f(r['full_zero_shot'])} | {f(r['full_finetuned'])} | "
                     f"{100 * r['gap_closed']:.0f}% | {margin} |")  # fmt: skip
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


def plot(rows: list[dict], path: Path) -> None:
    """Gap closed against privacy margin, one point per recipe and task: the frontier to choose on."""

    def draw(ax, sub, scale):
        for r in sub:
            ax.scatter(100 * r["gap_closed"], scale * r["privacy_margin"])
            ax.annotate(
                r["recipe"], (100 * r["gap_closed"], scale * r["privacy_margin"]), fontsize=7
            )

    _panels(rows, path, draw, 80, "")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", nargs="+", default=["drop", "layerwise"])
    p.add_argument("--task", action="append", default=[])
    p.add_argument("--data-root", default=None)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens per sequence (default 128 for text tasks, 256 for choice tasks)")  # fmt: skip
    p.add_argument("--learning-rate", type=float, default=1e-3, help="the adapter's")
    p.add_argument("--full-learning-rate", type=float, default=2e-4)
    p.add_argument("--mixed-precision", choices=PRECISIONS, default="no")
    p.add_argument("--eval-limit", type=int, default=300)
    p.add_argument("--train-limit", type=int, default=2000)
    p.add_argument("--seed", type=int, default=None, help="one seed (as --seeds SEED)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run each recipe x task once per seed: batch order and item sample (default 42)")  # fmt: skip
    p.add_argument("--out", default="runs/transfer_study")
    p.add_argument("--from-rows", nargs="+", default=None, metavar="ROWS_JSONL",
                   help="build nothing: table and plot the rows of earlier runs (OUT/table.md, OUT/frontier.png)")  # fmt: skip
    return p


def main() -> None:
    p = _parser()
    a = p.parse_args()
    out = Path(a.out)
    if a.from_rows:
        rows = read_rows(a.from_rows, p.error)  # before anything is written
        out.mkdir(parents=True, exist_ok=True)
        report(rows, out)
        return
    seeds = a.seeds or [a.seed if a.seed is not None else TrainConfig.seed]
    try:
        arms = load_recipes(a.recipes)  # every file checked before the model is loaded
    except OffsiteError as e:
        p.error(str(e))
    out.mkdir(parents=True, exist_ok=True)
    full, tok = (
        load_model(a.model, torch.float32),
        load_tokenizer(a.model),
    )  # as the README's tables
    full.requires_grad_(False)
    sample = load_data(PUBLIC_SAMPLE, tok, 128)
    sample = replace(
        sample, examples=sample.examples[64:80]
    )  # not the sequences layer-wise fits on
    ceilings = _Ceilings(out / "ceilings.json")
    done = _done(out)
    budget = f"steps={a.steps}|bs={a.batch_size}|block={a.block_size}|lr={a.full_learning_rate}|mp={a.mixed_precision}|n={a.eval_limit}"  # fmt: skip
    rows = []
    for spec, arm in arms.items():
        emulator, plan, record, seconds = build(full, tok, arm)
        score = transfer_score(full, emulator, plan, sample, pad_id=pad_id_of(tok))
        print(
            f"[{spec}] built in {seconds:.0f}s, kept {list(plan.kept)}, transfer {score}",
            flush=True,
        )
        # task-major, so a run stopped part-way has whole tasks (every seed) rather than one seed of each
        for name in a.task or ["shakespeare"]:
            for seed in seeds:
                if (spec, name, seed, budget) in done:
                    print(
                        f"[{spec}] {name} seed {seed}: in {out / 'rows.jsonl'} already", flush=True
                    )
                    continue
                (task,) = tasks_for(
                    [name], a.data_root, a.block_size, a.eval_limit, a.train_limit, seed
                )
                cfg = TrainConfig(max_steps=a.steps, batch_size=a.batch_size, learning_rate=a.learning_rate, warmup_steps=2,
                                  save_every=0, seed=seed, mixed_precision=a.mixed_precision)  # fmt: skip
                key = f"{task.name}|seed={seed}|{budget}"
                t0 = time.perf_counter()
                r = evaluate_offsite(full, tok, plan, emulator, task, cfg, full_learning_rate=a.full_learning_rate,
                                     ceiling=ceilings.get(key))  # fmt: skip
                ceilings.put(key, r["full_finetuned"])
                row = {"recipe": spec, "task_arg": name, "seed": seed, "budget": budget, "build_s": round(seconds, 1),
                       "run_s": round(time.perf_counter() - t0, 1), "batch_size": a.batch_size, "block_size": a.block_size,
                       "mixed_precision": a.mixed_precision, "transfer": score, "kept": list(plan.kept),
                       "adapter": list(plan.adapter), "record": record,
                       **{k: v for k, v in r.items() if k != "curves"}}  # fmt: skip
                rows.append(row)
                with (out / "rows.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(table([row]).splitlines()[-1], flush=True)
    report(_earlier_rows(out) if done else rows, out)


def _done(out: Path) -> set[tuple]:
    """(recipe, task, seed, budget) of the rows an earlier run into `out` measured: a rerun skips them."""
    return {
        (r["recipe"], r["task_arg"], r["seed"], r["budget"])
        for r in _earlier_rows(out)
        if "budget" in r
    }


def _earlier_rows(out: Path) -> list[dict]:
    f = out / "rows.jsonl"
    return (
        [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if f.exists()
        else []
    )


class _Ceilings:
    """Full-model fine-tuning results by (task, seed, budget), kept in a JSON file between runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str) -> float | None:
        return self.data.get(key)

    def put(self, key: str, value: float) -> None:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")


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


def budget(r: dict) -> str:
    """A row's training budget, e.g. '40x4x128'."""
    block = r.get("block_size") or (128 if r["metric"] == "perplexity" else 256)
    return f"{r['steps']}x{r.get('batch_size', 4)}x{block}"


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per task x recipe x budget: mean and 95% interval over its seeds, floors by the interval."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["recipe"], budget(r))].append(r)
    out = []
    for (task, recipe, b), sub in sorted(groups.items()):
        acc = sub[0]["metric"] == "accuracy"
        floor = 0.03 if acc else 1.3
        ivs = {k: interval([r[k] for r in sub if r.get(k) is not None])
               for k in ("gap_closed", "privacy_margin", "plug_in", "emulator_finetuned", "emulator_zero_shot",
                         "full_zero_shot", "full_finetuned")}  # fmt: skip
        emu_ratio = (
            None if acc else interval([r["emulator_zero_shot"] / r["full_zero_shot"] for r in sub])
        )
        out.append({"task": task, "recipe": recipe, "budget": b, "metric": sub[0]["metric"],
                    "seeds": sorted(r.get("seed") for r in sub), **ivs, "emulator_over_full": emu_ratio,
                    "margin_floor": floor, "margin_kept": kept(ivs["privacy_margin"], floor),
                    "emulator_floor_kept": None if emu_ratio is None else kept(emu_ratio, 3.0),
                    "run_s": interval([r.get("run_s", 0.0) for r in sub])["mean"]})  # fmt: skip
    return out


def summary_table(summary: list[dict]) -> str:
    head = ("| task | recipe | budget | seeds | full zero-shot | emulator fine-tuned | plug-in | full fine-tuned | "
            "gap closed | privacy margin | margin floor kept | emulator alone / full |")  # fmt: skip
    lines = [head, "|" + "---|" * 12]
    for s in summary:
        acc = s["metric"] == "accuracy"
        v = (lambda iv: fmt(iv, 100, 1, "%")) if acc else (lambda iv: fmt(iv, 1, 2))
        margin = (
            fmt(s["privacy_margin"], 100, 1, " pts") if acc else fmt(s["privacy_margin"], 1, 2, "x")
        )
        ratio = "-" if s["emulator_over_full"] is None else fmt(s["emulator_over_full"], 1, 1, "x")
        yes = {True: "yes", False: "**no**", None: "n=1"}
        lines.append(f"| {s['task']} | {s['recipe']} | {s['budget']} | {','.join(map(str, s['seeds']))} | "
                     f"{v(s['full_zero_shot'])} | {v(s['emulator_finetuned'])} | {v(s['plug_in'])} | "
                     f"{v(s['full_finetuned'])} | {fmt(s['gap_closed'], 100, 0, '%')} | {margin} | "
                     f"{yes[s['margin_kept']]} | {ratio} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _err(iv: dict, k: float) -> list | None:
    """A matplotlib error bar for interval `iv` scaled by `k` (None with a single run)."""
    if iv["low"] is None:
        return None
    return [[k * (iv["mean"] - iv["low"])], [k * (iv["high"] - iv["mean"])]]


def plot_summary(summary: list[dict], path: Path) -> None:
    """Gap closed against privacy margin with 95% intervals, one point per recipe x budget."""

    def draw(ax, sub, scale):
        for s in sub:
            g, m = s["gap_closed"], s["privacy_margin"]
            ax.errorbar(
                100 * g["mean"],
                scale * m["mean"],
                xerr=_err(g, 100),
                yerr=_err(m, scale),
                fmt="o",
                capsize=3,
            )
            ax.annotate(
                f"{s['recipe']} {s['budget']}", (100 * g["mean"], scale * m["mean"]), fontsize=7
            )

    _panels(summary, path, draw, 90, " (mean and 95% interval over seeds)")


def report(rows: list[dict], out: Path) -> None:
    """OUT/table.md (every run), OUT/summary.{md,json} and OUT/summary.png (over seeds), printed too."""
    (out / "table.md").write_text(table(rows))
    plot(rows, out / "frontier.png")
    summary = summarize(rows)
    (out / "summary.md").write_text(summary_table(summary))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_summary(summary, out / "summary.png")
    print(table(rows))
    print(summary_table(summary))
    for name in {r["task"] for r in rows}:
        sub = [r for r in rows if r["task"] == name]
        rho = spearman([r["transfer"]["mean"] for r in sub], [r["gap_closed"] for r in sub])
        print(f"{name}: Spearman(transfer score, gap closed) = {rho}")


if __name__ == "__main__":
    main()
