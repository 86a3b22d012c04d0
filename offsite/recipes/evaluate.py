"""`owner evaluate-offsite`: the five settings of a bundle on each task, written as results."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from offsite.artefacts.bundle import open_bundle
from offsite.artefacts.peft_delta import PeftOptions
from offsite.atomic import atomic_directory, check_output_dir
from offsite.emulator.plan import bundle_plan
from offsite.errors import OffsiteError
from offsite.evaluation.five_settings import FULL_LEARNING_RATE, evaluate_offsite, write_results
from offsite.evaluation.specs import data_root, load_task
from offsite.evaluation.tasks import Task, build_task, load_task_files
from offsite.models.fingerprint import model_fingerprint
from offsite.models.loading import DEFAULT_MODEL, load_model, load_tokenizer
from offsite.training.config import StepInfo, TrainConfig
from offsite.training.finetune import ADAPTER_LEARNING_RATE


@dataclass(frozen=True)
class EvaluateSpec:
    """Which bundle, which tasks (named specs, or a train/test text pair), and the training budget."""

    bundle: Path
    out: Path
    model: str = DEFAULT_MODEL
    tasks: tuple[str, ...] = ()
    train_file: Path | None = None
    test_file: Path | None = None
    data_root: str | None = None
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            max_steps=40, learning_rate=ADAPTER_LEARNING_RATE, warmup_steps=2, save_every=0
        )
    )
    full_learning_rate: float | None = FULL_LEARNING_RATE
    full_finetune: bool = True
    block_size: int | None = None
    eval_limit: int | None = None
    train_limit: int | None = None
    dtype: torch.dtype | None = None
    overwrite: bool = False
    peft: PeftOptions | None = None  # PEFT inside the adapter blocks instead of training them


def resolve_tasks(spec: EvaluateSpec) -> list[Task]:
    """The runnable tasks, checked (specs and data files) before any model is loaded."""
    if spec.tasks and (spec.train_file or spec.test_file):
        raise OffsiteError(
            "give `tasks`, or `train_file` and `test_file` (a language-modelling task), not both"
        )
    if not spec.tasks:
        if not (spec.train_file and spec.test_file):
            raise OffsiteError(
                "name a task: `tasks` NAME|SPEC.yaml|lm-eval:NAME, or `train_file` and `test_file` files"
            )
        return [
            load_task_files(
                spec.train_file, spec.test_file, spec.block_size or 128, spec.eval_limit
            )
        ]
    root = data_root(spec.data_root)
    return [build_task(load_task(t), root, block_size=spec.block_size, eval_limit=spec.eval_limit,
                       train_limit=spec.train_limit, seed=spec.train.seed) for t in spec.tasks]  # fmt: skip


def evaluate(
    spec: EvaluateSpec,
    *,
    on_phase: Callable[[str, str], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> list[dict]:
    """Run the five settings per task; writes OUT/summary.* and OUT/TASK/result.*; returns the results."""
    check_output_dir(spec.out, spec.overwrite)
    tasks = resolve_tasks(spec)
    bundle = open_bundle(spec.bundle)
    model = load_model(spec.model, dtype=spec.dtype)
    if model_fingerprint(model) != bundle.base_fingerprint:
        raise OffsiteError(
            f"{spec.bundle}: bundle was not made from `model` {spec.model} in this dtype "
            "(pass the `dtype` it was packaged with)"
        )
    tok = load_tokenizer(spec.model)
    results = []
    for task in tasks:
        phase = (lambda name, t=task.name: on_phase(t, name)) if on_phase else None
        r = evaluate_offsite(model, tok, bundle_plan(bundle.manifest), bundle.load_model(), task, spec.train,
                             full_finetune=spec.full_finetune, full_learning_rate=spec.full_learning_rate,
                             on_phase=phase, on_step=on_step, peft=spec.peft)  # fmt: skip
        results.append({"model": spec.model, "bundle": str(bundle.path), **r})
    with atomic_directory(spec.out, overwrite=spec.overwrite) as tmp:
        write_results(results, tmp)
    return results
