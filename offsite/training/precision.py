"""Mixed precision per training run, with torch's own autocast and gradient scaler.

accelerate holds one precision for the whole process (its `AcceleratorState` is a singleton that
refuses a second value), while the library runs several trainings in one process (a study, the
five-settings evaluation, federated rounds, an emulator's distillation then a fine-tune), each
with its own `mixed_precision`. So the `Accelerator` always runs in full precision, and each run
applies its own here: `torch.autocast` for the forward pass and, for fp16, a `GradScaler` around
the backward pass and the optimizer step. Nothing of accelerate's private state is touched, and an
`Accelerator` the user made in the same process is left as it is.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from offsite.errors import OffsiteError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """One run's precision on one device (`mode`: no, bf16 or fp16)."""

    mode: str
    device_type: str
    scaler: torch.amp.GradScaler | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.mode == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=_DTYPES[self.mode])

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on (fp16: scaled, so that small gradients do not underflow)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring the gradients back to their true size (before they are clipped)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, sync: bool) -> None:
        """The optimizer step; fp16 skips a step whose gradients overflowed and adapts its scale."""
        if self.scaler is None:
            optimizer.step()
        elif sync:  # between accumulation steps there is nothing to step or rescale
            self.scaler.step(optimizer)
            self.scaler.update()


def precision_for(mode: str, device: torch.device) -> Precision:
    """`mode` on `device`, or a clear error where the hardware lacks it."""
    if mode == "fp16":
        if device.type == "cpu":
            raise OffsiteError("`mixed_precision` fp16 needs a GPU; on CPU use bf16")
        return Precision(mode, device.type, torch.amp.GradScaler(device.type))
    if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise OffsiteError("`mixed_precision` bf16: this GPU has no bf16; use fp16")
    return Precision(mode, device.type)
