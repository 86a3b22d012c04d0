"""The settings of one training run (`TrainConfig`) and what the loop reports after each step."""

from __future__ import annotations

import math
from dataclasses import dataclass

from offsite.errors import OffsiteError
from offsite.training.loss import CHUNK_TOKENS
from offsite.training.privacy import DPConfig

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; `max_steps` (optimizer steps) overrides `epochs` when set."""

    epochs: int = 1
    max_steps: int | None = None
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 42
    mixed_precision: str = "no"
    save_every: int = 50
    eval_every: int = 0
    dp: DPConfig | None = None  # DP-SGD (per-sample clipping + noise) for the whole run
    # the loss over this many positions at a time (0: the model's own loss, full logits at once)
    loss_chunk_tokens: int = CHUNK_TOKENS
    gradient_checkpointing: bool = False  # recompute block activations in the backward pass
    # this run is part i of n equal parts of one run: its learning-rate schedule and its batch order
    # (federated rounds: round i continues where round i-1 left off, instead of restarting the
    # warm-up and decay on the same first batches)
    schedule_part: tuple[int, int] = (0, 1)

    def __post_init__(self) -> None:
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
        }
        for name, value in positive.items():
            if value < 1:
                raise OffsiteError(f"`{name}` must be at least 1 (got {value})")
        if self.max_steps is not None and self.max_steps < 1:
            raise OffsiteError(f"`max_steps` must be at least 1 (got {self.max_steps})")
        for name in ("learning_rate", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise OffsiteError(f"`{name}` must be a finite number (got {value})")
        if not self.learning_rate > 0:
            raise OffsiteError(f"`learning_rate` must be positive (got {self.learning_rate})")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise OffsiteError(
                f"`weight_decay` and `max_grad_norm` must be >= 0 (got {self.weight_decay}, {self.max_grad_norm})"
            )
        if self.lr_scheduler not in SCHEDULES:
            raise OffsiteError(
                f"`lr_scheduler` {self.lr_scheduler!r} unknown; choose one of {', '.join(SCHEDULES)}"
            )
        if self.mixed_precision not in PRECISIONS:
            raise OffsiteError(
                f"`mixed_precision` {self.mixed_precision!r} unknown; choose one of {', '.join(PRECISIONS)}"
            )
        if min(self.warmup_steps, self.save_every, self.eval_every, self.loss_chunk_tokens) < 0:
            raise OffsiteError(
                "`warmup_steps`, `save_every`, `eval_every` and `loss_chunk_tokens` must be >= 0"
            )
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed < 2**63
        ):
            raise OffsiteError(
                f"`seed` must be a whole number from 0 to 2**63 - 1 (got {self.seed})"
            )
        if self.dp is not None and self.mixed_precision == "fp16":
            raise OffsiteError(
                "`dp` with `mixed_precision` fp16: per-sample clipping would see scaled gradients; use bf16 or no"
            )
        part, parts = self.schedule_part
        if not 0 <= part < parts:
            raise OffsiteError(f"schedule part {part} of {parts}: needs 0 <= part < parts")


@dataclass(frozen=True)
class StepInfo:
    """Progress after one optimizer step (reported on the main process only)."""

    step: int
    max_steps: int
    epoch: int
    loss: float
    learning_rate: float
    tokens: int
    tokens_per_s: float
    val_perplexity: float | None = None
