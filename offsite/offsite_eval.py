"""The five numbers that say whether offsite-tuning worked on a task (paper, Table 1).

full zero-shot, emulator zero-shot, emulator fine-tuned (what the data owner gets alone),
plug-in (full model + returned adapter) and, optionally, full-model fine-tuning (the ceiling),
all as held-out perplexity after the same number of steps on the same batches; plus the share of
the zero-shot-to-full-fine-tuning gap the plug-in closes, and the privacy margin (how much worse
the emulator fine-tuned stays than the plug-in).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel

from offsite.adapter import extract_adapter, plug_adapter
from offsite.bundle import package_emulator
from offsite.data import TokenData, load_data, pad_id_of
from offsite.evaluation import perplexity
from offsite.finetune import freeze_except_adapter
from offsite.split import SplitPlan
from offsite.training import StepInfo, TrainConfig, train


@dataclass(frozen=True)
class TaskFiles:
    """A language-modelling task: training text and held-out text."""

    train: Path
    test: Path
    block_size: int = 256
    eval_sequences: int | None = None


def _heldout(task: TaskFiles, tokenizer) -> TokenData:
    data = load_data(task.test, tokenizer, task.block_size)
    if task.eval_sequences:
        data = TokenData(data.examples[: task.eval_sequences], data.source, data.sha256, data.mode)
    return data


def derived(r: dict) -> dict:
    """Gap closed by the plug-in and the privacy margin, from the five perplexities."""
    out = {}
    if r.get("full_finetuned") is not None and r["full_zero_shot"] != r["full_finetuned"]:
        out["gap_closed"] = (r["full_zero_shot"] - r["plug_in"]) / (
            r["full_zero_shot"] - r["full_finetuned"]
        )
    out["privacy_margin"] = (
        r["emulator_finetuned"] / r["plug_in"]
    )  # >1: the data owner alone does worse
    return out


def evaluate_offsite(
    full: PreTrainedModel,
    tokenizer,
    plan: SplitPlan,
    emulator: PreTrainedModel,
    task: TaskFiles,
    cfg: TrainConfig,
    *,
    full_finetune: bool = True,
    on_phase: Callable[[str], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> dict:
    """Run the five settings on one task; `full` is left unchanged. Returns numbers and curves."""
    phase = on_phase or (lambda name: None)
    pad = pad_id_of(tokenizer)
    train_data, held = load_data(task.train, tokenizer, task.block_size), _heldout(task, tokenizer)
    r: dict = {
        "tokens_evaluated": sum(len(e.input_ids) for e in held.examples),
        "steps": cfg.max_steps,
    }
    phase("full model zero-shot")
    r["full_zero_shot"] = perplexity(full, held, pad_id=pad)["perplexity"]
    phase("emulator zero-shot")
    r["emulator_zero_shot"] = perplexity(emulator, held, pad_id=pad)["perplexity"]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = package_emulator(
            full, tokenizer, plan, Path(tmp) / "bundle", base_name="eval", emulator=emulator
        )
        student = bundle.load_model()
    freeze_except_adapter(student, bundle)
    phase("fine-tuning the adapter through the emulator")
    summary = train(student, train_data, cfg, pad_id=pad, on_step=on_step)
    r["curves"] = {"emulator_finetune": [h["loss"] for h in summary["history"]]}
    phase("emulator fine-tuned")
    r["emulator_finetuned"] = perplexity(student, held, pad_id=pad)["perplexity"]
    phase("plug-in")
    plugged = copy.deepcopy(full)
    plug_adapter(plugged, extract_adapter(student, bundle))
    r["plug_in"] = perplexity(plugged, held, pad_id=pad)["perplexity"]
    del plugged, student
    r["full_finetuned"] = None
    if full_finetune:
        phase("full-model fine-tuning")
        tuned = copy.deepcopy(full)
        tuned.requires_grad_(True)
        summary = train(tuned, train_data, cfg, pad_id=pad, on_step=on_step)
        r["curves"]["full_finetune"] = [h["loss"] for h in summary["history"]]
        r["full_finetuned"] = perplexity(tuned, held, pad_id=pad)["perplexity"]
    return {**r, **derived(r)}


def five_settings_table(r: dict) -> str:
    """The five numbers and the two derived figures as a Markdown table."""
    rows = [("full model zero-shot", r["full_zero_shot"]), ("emulator zero-shot", r["emulator_zero_shot"]),
            ("emulator fine-tuned (data owner alone)", r["emulator_finetuned"]),
            ("plug-in (full model + adapter)", r["plug_in"]), ("full-model fine-tuning", r.get("full_finetuned"))]  # fmt: skip
    lines = ["| setting | held-out perplexity |", "|---|---|"]
    lines += [
        f"| {name} | {value:.2f} |" if value is not None else f"| {name} | not run |"
        for name, value in rows
    ]
    if r.get("gap_closed") is not None:
        lines.append(f"| gap closed by plug-in | {100 * r['gap_closed']:.0f}% |")
    lines.append(f"| privacy margin (emulator fine-tuned / plug-in) | {r['privacy_margin']:.2f}x |")
    return "\n".join(lines) + "\n"
