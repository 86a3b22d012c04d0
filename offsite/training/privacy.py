"""Differential privacy for the data owner: DP-SGD on what trains (the adapter), through opacus.

Per-sample gradients are computed only for the trainable parameters (the emulator is frozen),
each sample's gradient is clipped to `max_grad_norm`, Gaussian noise is added at the multiplier
that reaches (`epsilon`, `delta`) after the planned steps, and the privacy spent is reported with
the accountant that computed it. Sampling: the loop draws shuffled fixed-size batches, the
common practical stand-in for the Poisson sampling the accountants assume (said in the report).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch
from torch import nn

from offsite.errors import OffsiteError

ACCOUNTANTS = ("rdp", "prv", "gdp")
DEFAULT_DELTA = (
    1e-5  # without --dp-delta; the data owner should pick one below 1/(its example count)
)


@dataclass(frozen=True)
class DPConfig:
    """The guarantee to train under: (epsilon, delta) over the whole run, per-sample clip norm."""

    epsilon: float
    delta: float
    max_grad_norm: float = 1.0
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise OffsiteError(f"`epsilon` {self.epsilon} must be a finite number > 0")
        if not 0 < self.delta < 1:
            raise OffsiteError(
                f"`delta` {self.delta} must be in (0, 1), e.g. 1/(number of examples)"
            )
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise OffsiteError(
                "`max_grad_norm` must be a finite number > 0 with `epsilon` (it bounds each sample's gradient)"
            )
        if self.accountant not in ACCOUNTANTS:
            raise OffsiteError(
                f"`accountant` {self.accountant!r} unknown; choose one of {', '.join(ACCOUNTANTS)}"
            )


def noise_multiplier(dp: DPConfig, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier that keeps `steps` steps at `sample_rate` within (epsilon, delta)."""
    from opacus.accountants.utils import get_noise_multiplier

    try:
        return float(get_noise_multiplier(target_epsilon=dp.epsilon, target_delta=dp.delta,
                                          sample_rate=sample_rate, steps=steps, accountant=dp.accountant))  # fmt: skip
    except ValueError as e:
        raise OffsiteError(f"`dp.epsilon` {dp.epsilon}: {str(e).splitlines()[0]}") from None


def privatize(model: nn.Module, optimizer: torch.optim.Optimizer, dp: DPConfig, batch_size: int,
              sample_rate: float, steps: int):  # fmt: skip
    """(the model with per-sample gradient hooks on what trains, a DP optimizer, its noise multiplier)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    try:
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    except (
        NotImplementedError
    ) as e:  # a trainable module opacus cannot take per-sample gradients of
        raise OffsiteError(f"`dp.epsilon`: {str(e).splitlines()[0]}") from None
    noise = noise_multiplier(dp, sample_rate, steps)
    # the noise must be unknown to whoever sees the adapter: a generator seeded from the OS's
    # entropy at every (re)start, never from --seed (recorded in the manifest, default 42), and
    # opacus's secure_mode sampling, which resists the floating-point attacks on Gaussian noise
    device = next(p.device for p in model.parameters() if p.requires_grad)
    generator = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    dp_optimizer = DPOptimizer(optimizer, noise_multiplier=noise, max_grad_norm=dp.max_grad_norm,
                               expected_batch_size=batch_size, loss_reduction="mean",
                               generator=generator, secure_mode=True)  # fmt: skip
    return wrapped, dp_optimizer, noise


def spent(dp: DPConfig, noise: float, sample_rate: float, steps: int) -> dict:
    """The privacy spent after `steps` steps, as the accountant computes it (for the manifest)."""
    from opacus.accountants import create_accountant

    accountant = create_accountant(dp.accountant)
    accountant.history = [(noise, sample_rate, steps)] if steps else []
    epsilon = accountant.get_epsilon(delta=dp.delta) if steps else 0.0
    return {"epsilon": round(float(epsilon), 4), "delta": dp.delta, "target_epsilon": dp.epsilon,
            "accountant": f"opacus {dp.accountant}", "noise_multiplier": round(noise, 6),
            "sample_rate": sample_rate, "steps": steps, "max_grad_norm": dp.max_grad_norm,
            "sampling": "shuffled fixed-size batches; the accountant assumes Poisson sampling at this rate",
            "randomness": "batch order and noise drawn from the OS's entropy, not from the seed; noise "
                          "sampled in opacus's secure_mode (no CSPRNG: torchcsprng is not available)"}  # fmt: skip
