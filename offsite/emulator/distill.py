"""Emulator distillation: train the kept middle blocks to imitate the full middle.

loss = LM loss of the emulator + w * mean(((teacher - student) / rms(teacher))^2), over the hidden
state entering the top adapter (paper: w = 30, lr 1e-4, cosine schedule with warm-up). The
adapter blocks, embeddings, norm and head stay frozen; the teacher's middle runs under no_grad
and stops at that hidden state (a forward hook ends its pass early).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from offsite.emulator.build import build_emulator
from offsite.emulator.plan import SplitPlan
from offsite.errors import OffsiteError
from offsite.models.architectures import get_blocks, hidden_of
from offsite.training.config import StepInfo, TrainConfig
from offsite.training.data import TokenData
from offsite.training.loop import make_accelerator, train

DEFAULT_WEIGHT = 30.0


class _Stop(Exception):
    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


@dataclass
class DistillLoss:
    """Student LM loss plus the normalised hidden-state distance to the teacher (a LossFn)."""

    teacher: PreTrainedModel
    teacher_block: nn.Module
    student_block: nn.Module
    weight: float = DEFAULT_WEIGHT

    def __post_init__(self) -> None:
        self._student_hidden: torch.Tensor | None = None
        self._handles = [
            self.student_block.register_forward_hook(self._capture),
            self.teacher_block.register_forward_hook(self._stop),
        ]

    def remove(self) -> None:
        """Take the hooks off both models (the teacher is the caller's full model)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._student_hidden = None

    def _capture(self, module, args, output) -> None:
        self._student_hidden = hidden_of(output)

    @staticmethod
    def _stop(module, args, output) -> None:
        raise _Stop(hidden_of(output))

    @torch.no_grad()
    def target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's hidden state entering the top adapter (its forward pass stops there)."""
        try:
            self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        except _Stop as stop:
            return stop.hidden
        raise OffsiteError(
            "the teacher's hook did not fire; the split plan does not fit this model"
        )

    def hidden_loss(
        self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        rms = teacher.float().pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
        per_token = (((teacher.float() - student.float()) / rms) ** 2).mean(-1)
        return (per_token * mask).sum() / mask.sum().clamp_min(1)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        target = self.target(batch)
        out = model(**batch)
        mse = self.hidden_loss(self._student_hidden, target, batch["attention_mask"].float())
        return out.loss + self.weight * mse


def student_and_loss(
    full: PreTrainedModel, plan: SplitPlan, weight: float, start: PreTrainedModel | None = None
) -> tuple[PreTrainedModel, DistillLoss]:
    """A trainable emulator (only kept middle blocks require grad; `start` if given, else a plain
    drop of `full`) and its distillation loss."""
    if not plan.kept:
        raise OffsiteError("the emulator keeps no middle block; nothing to distil")
    student = start if start is not None else build_emulator(full, plan)
    student = student.float()  # float32 master weights whatever the model's dtype
    student.requires_grad_(False)
    order = list(plan.emulator_order)
    for i in plan.kept:
        get_blocks(student)[order.index(i)].requires_grad_(True)
    teacher = copy.copy(full)  # same modules; only hooks differ
    teacher.requires_grad_(False)
    teacher.eval()
    loss = DistillLoss(
        teacher,
        get_blocks(full)[max(plan.middle)],
        get_blocks(student)[order.index(max(plan.kept))],
        weight,
    )
    return student, loss


def distill_emulator(
    full: PreTrainedModel,
    plan: SplitPlan,
    train_data: TokenData,
    cfg: TrainConfig,
    *,
    pad_id: int,
    weight: float = DEFAULT_WEIGHT,
    val_data: TokenData | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    on_step: Callable[[StepInfo], None] | None = None,
    start: PreTrainedModel | None = None,
) -> tuple[PreTrainedModel, dict]:
    """Distil an emulator for `plan` from `full` (from `start`, e.g. a layer-wise distilled one);
    keeps the weights with the best validation perplexity."""
    acc = make_accelerator(cfg)
    student, loss = student_and_loss(full, plan, weight, start)
    full.to(acc.device)
    try:
        summary = train(
            student, train_data, cfg, pad_id=pad_id, val_data=val_data, checkpoint_dir=checkpoint_dir, resume=resume,
            run_key={"plan": [list(plan.adapter), list(plan.kept)], "weight": weight}, on_step=on_step,
            accelerator=acc, loss_fn=loss, keep_best=val_data is not None,
        )  # fmt: skip
    finally:
        loss.remove()
    student = acc.unwrap_model(student)
    student.requires_grad_(False)
    return student.eval(), {**summary, "weight": weight, "history": summary["history"][-50:]}
