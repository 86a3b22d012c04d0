"""PNG figures of evaluation results (matplotlib, no display needed)."""

from __future__ import annotations

import io
from pathlib import Path

from offsite.atomic import write_bytes_atomic

_SHORT = {"full_zero_shot": "full\nzero-shot", "emulator_zero_shot": "emulator\nzero-shot",
          "emulator_finetuned": "emulator\nfine-tuned", "plug_in": "plug-in",
          "full_finetuned": "full\nfine-tuned"}  # fmt: skip
_COLOURS = ("#9e9e9e", "#e57373", "#ffb74d", "#43a047", "#1e88e5")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def five_settings_png(r: dict, path: Path) -> None:
    """Left: the five settings as bars (with the task's metric); right: the training curves."""
    plt = _pyplot()
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(11, 4.2))
    keys = [k for k in _SHORT if r.get(k) is not None]
    accuracy = r.get("metric") == "accuracy"
    values = [100 * r[k] if accuracy else r[k] for k in keys]
    drawn = bars.bar([_SHORT[k] for k in keys], values, color=_COLOURS[: len(keys)])
    bars.bar_label(drawn, fmt="%.1f" if accuracy else "%.2f", fontsize=8)
    bars.set_ylabel("accuracy (%)" if accuracy else "held-out perplexity (lower is better)")
    if not accuracy and max(values) > 20 * min(values):
        bars.set_yscale("log")
    gap = r.get("gap_closed")
    bars.set_title(f"{r.get('task', 'task')}" + (f": plug-in closes {100 * gap:.0f}% of the gap" if gap is not None else ""), fontsize=10)  # fmt: skip
    bars.tick_params(axis="x", labelsize=8)
    for name, losses in (r.get("curves") or {}).items():
        curves.plot(range(1, len(losses) + 1), losses, label=name.replace("_", " "))
    curves.set_xlabel("step")
    curves.set_ylabel("training loss")
    curves.set_title("fine-tuning (same batches)", fontsize=10)
    if r.get("curves"):
        curves.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
