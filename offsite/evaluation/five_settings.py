"""The five numbers that say whether offsite-tuning worked on a task (paper, Table 1).

full zero-shot, emulator zero-shot, emulator fine-tuned (what the data owner gets alone),
plug-in (full model + returned adapter) and, optionally, full-model fine-tuning (the ceiling),
all on the same task (held-out perplexity or accuracy) after the same number of steps on the
same batches; plus the share of the zero-shot-to-full-fine-tuning gap the plug-in closes, and the
privacy margin (how much worse the emulator fine-tuned stays than the plug-in).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from offsite.artefacts.adapter import plug_adapter
from offsite.artefacts.peft_delta import PeftOptions, plug_delta
from offsite.atomic import write_bytes_atomic, write_json_atomic
from offsite.emulator.package import package_emulator
from offsite.emulator.plan import SplitPlan
from offsite.evaluation.tasks import Task
from offsite.training.config import StepInfo, TrainConfig
from offsite.training.data import TokenData, pad_id_of
from offsite.training.finetune import train_adapter
from offsite.training.loop import train

# The full-model ceiling's learning rate (README: 2e-4 beat 1e-3 and 1e-4 for full fine-tuning).
FULL_LEARNING_RATE = 2e-4

SETTINGS = (
    "full_zero_shot",
    "emulator_zero_shot",
    "emulator_finetuned",
    "plug_in",
    "full_finetuned",
)
LABELS = {"full_zero_shot": "full model zero-shot", "emulator_zero_shot": "emulator zero-shot",
          "emulator_finetuned": "emulator fine-tuned (data owner alone)",
          "plug_in": "plug-in (full model + adapter)", "full_finetuned": "full-model fine-tuning"}  # fmt: skip


def derived(r: dict) -> dict:
    """Gap closed by the plug-in and the privacy margin, from the five numbers.

    Perplexity (lower is better): margin = emulator fine-tuned / plug-in (a ratio, >1 protects).
    Accuracy (higher is better): margin = plug-in - emulator fine-tuned (points, >0 protects).
    """
    out = {}
    ft, zs = r.get("full_finetuned"), r["full_zero_shot"]
    if ft is not None and zs != ft:
        out["gap_closed"] = (r["plug_in"] - zs) / (ft - zs)
    if r.get("higher_is_better"):
        out["privacy_margin"] = r["plug_in"] - r["emulator_finetuned"]
    else:
        out["privacy_margin"] = r["emulator_finetuned"] / r["plug_in"]
    return out


# what a run cannot change once the task, its items and batches are fixed: a study comparing
# emulators or learning rates may measure these once and pass them in (`measured`)
REUSABLE = ("full_zero_shot", "emulator_zero_shot", "full_finetuned")


class Scoreboard:
    """The five settings of one task as they are measured; `result()` adds the derived figures.

    `measured`: settings already measured on this task (keys of REUSABLE), used as they are."""

    def __init__(
        self,
        task: Task,
        tokenizer,
        on_phase: Callable[[str], None] | None = None,
        measured: dict[str, float] | None = None,
    ) -> None:
        self.task, self.tokenizer, self.phase = task, tokenizer, on_phase or (lambda name: None)
        self.known = dict(measured or {})
        if unknown := set(self.known) - set(REUSABLE):
            raise ValueError(f"measured: {sorted(unknown)} depend on the run; only {REUSABLE} can be reused")  # fmt: skip
        self.r: dict = {"task": task.name, "metric": task.metric, "higher_is_better": task.higher_is_better,
                        "details": {}, "curves": {}, "full_finetuned": None}  # fmt: skip

    def score(self, setting: str, model: nn.Module) -> None:
        if setting in self.known:  # measured before on the same items: not again
            self.r[setting], self.r["details"][setting] = self.known[setting], {"reused": True}
            return
        self.phase(LABELS[setting])
        out = self.task.score(model, self.tokenizer)
        self.r[setting] = out.pop("value")
        self.r["details"][setting] = out

    def full_finetune(self, full: PreTrainedModel, train_data: TokenData, cfg: TrainConfig, on_step=None) -> None:  # fmt: skip
        """The ceiling: a copy of the full model fine-tuned on the same batches, then scored."""
        if "full_finetuned" in self.known:
            self.score("full_finetuned", full)
            return
        self.phase("full-model fine-tuning")
        tuned = copy.deepcopy(full).float()  # float32 master weights, whatever the model's dtype
        tuned.requires_grad_(True)
        summary = train(tuned, train_data, cfg, pad_id=pad_id_of(self.tokenizer), on_step=on_step)
        self.r["curves"]["full_finetune"] = [h["loss"] for h in summary["history"]]
        self.score("full_finetuned", tuned)

    def result(self, **extra) -> dict:
        return {**self.r, **extra, **derived(self.r)}


def evaluate_offsite(
    full: PreTrainedModel,
    tokenizer,
    plan: SplitPlan,
    emulator: PreTrainedModel,
    task: Task,
    cfg: TrainConfig,
    *,
    full_finetune: bool = True,
    full_learning_rate: float | None = None,
    measured: dict[str, float] | None = None,
    on_phase: Callable[[str], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    peft: PeftOptions | None = None,
) -> dict:
    """Run the five settings on one task; `full` is left unchanged. Returns numbers and curves.

    `peft`: train PEFT modules inside the adapter blocks instead of the blocks themselves.

    `cfg` trains the adapter, and the full-model ceiling on the same batches but at
    `full_learning_rate` (default `cfg`'s): the two want different rates, and each should get its best.
    `measured`: settings already measured on this task, its items and these batches (REUSABLE: the
    full model's zero-shot and fine-tuned scores, and this emulator's zero-shot score), used as they
    are instead of measured again: a study comparing emulators or learning rates measures each once.
    """
    full_cfg = replace(cfg, learning_rate=full_learning_rate or cfg.learning_rate)
    board = Scoreboard(task, tokenizer, on_phase, measured)
    train_data = task.train_data(tokenizer)
    board.score("full_zero_shot", full)
    board.score("emulator_zero_shot", emulator)
    with (
        tempfile.TemporaryDirectory() as tmp
    ):  # the data owner's side: from a bundle, as `finetune`
        bundle = package_emulator(
            full, tokenizer, plan, Path(tmp) / "bundle", base_name="eval", emulator=emulator
        )
        board.phase("fine-tuning the adapter through the emulator")
        run = train_adapter(
            bundle, train_data, cfg, pad_id=pad_id_of(tokenizer), peft=peft, on_step=on_step
        )
    peft = run.peft
    student = run.model.float()  # scored outside autocast: one dtype again
    board.r["curves"]["emulator_finetune"] = [h["loss"] for h in run.summary["history"]]
    board.score("emulator_finetuned", student)
    state, kind, summary = run.state, run.kind, run.summary
    plugged = copy.deepcopy(full)
    if "peft" in kind:
        plugged = plug_delta(plugged, peft, bundle, state)
    else:
        plug_adapter(plugged, state)
    board.score("plug_in", plugged)
    del plugged, student
    if full_finetune or "full_finetuned" in board.known:
        board.full_finetune(full, train_data, full_cfg, on_step)
    return board.result(steps=cfg.max_steps, train_examples=len(train_data), learning_rate=cfg.learning_rate,
                        full_learning_rate=full_cfg.learning_rate, peft=peft.to_json() if peft else None,
                        trainable_parameters=sum(v.numel() for v in state.values()),
                        adapter_bytes=sum(v.numel() * v.element_size() for v in state.values()),
                        adapter_tokens_per_second=summary["tokens_this_run"] / max(summary["seconds_this_run"], 1e-9))  # fmt: skip


def _fmt(r: dict, value: float) -> str:
    return f"{100 * value:.1f}%" if r.get("metric") == "accuracy" else f"{value:.2f}"


def five_settings_table(r: dict) -> str:
    """The five numbers and the two derived figures as a Markdown table."""
    accuracy = r.get("metric") == "accuracy"
    lines = [f"| setting | {'accuracy' if accuracy else 'held-out perplexity'} |", "|---|---|"]
    for key in SETTINGS:
        value = r.get(key)
        lines.append(f"| {LABELS[key]} | {_fmt(r, value) if value is not None else 'not run'} |")
    if r.get("gap_closed") is not None:
        lines.append(f"| gap closed by plug-in | {100 * r['gap_closed']:.0f}% |")
    if accuracy:
        lines.append(f"| privacy margin (plug-in - emulator fine-tuned) | {100 * r['privacy_margin']:+.1f} points |")  # fmt: skip
    else:
        lines.append(f"| privacy margin (emulator fine-tuned / plug-in) | {r['privacy_margin']:.2f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


def summary_table(results: list[dict]) -> str:
    """One row per task: the five settings and the derived figures."""
    head = "| task | metric | full zero-shot | emulator zero-shot | emulator fine-tuned | plug-in | full fine-tuned | gap closed | privacy margin | adapter |"
    lines = [head, "|" + "---|" * 10]
    for r in results:
        cells = [_fmt(r, r[k]) if r.get(k) is not None else "-" for k in SETTINGS]
        gap = f"{100 * r['gap_closed']:.0f}%" if r.get("gap_closed") is not None else "-"
        margin = (f"{100 * r['privacy_margin']:+.1f} pts" if r.get("metric") == "accuracy"
                  else f"{r['privacy_margin']:.2f}x")  # fmt: skip
        lines.append(
            f"| {r['task']} | {r['metric']} | "
            + " | ".join(cells)
            + f" | {gap} | {margin} | {_adapter_cell(r)} |"
        )
    return "\n".join(lines) + "\n"


def _adapter_cell(r: dict) -> str:
    """What trained and how much of it travels: 'lora, 0.46M params, 1.8 MB'."""
    if r.get("trainable_parameters") is None:
        return "-"
    method = (r.get("peft") or {}).get("method", "blocks")
    size = r["adapter_bytes"]
    size_text = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"
    return f"{method}, {r['trainable_parameters']:,} params, {size_text}"


def write_results(results: list[dict], out: Path) -> None:
    """OUT/summary.{md,json} and, per task, OUT/TASK/result.{json,md,png}."""
    from offsite.evaluation.plots import five_settings_png

    for r in results:
        d = out / _safe_dirname(r["task"])
        d.mkdir(parents=True, exist_ok=True)
        write_json_atomic(d / "result.json", r)
        write_bytes_atomic(
            d / "result.md", (f"### {r['task']}\n\n" + five_settings_table(r)).encode()
        )
        five_settings_png(r, d / "result.png")
    write_json_atomic(
        out / "summary.json", [{k: v for k, v in r.items() if k != "curves"} for r in results]
    )
    write_bytes_atomic(out / "summary.md", summary_table(results).encode())


def _safe_dirname(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "task"
