"""The PEFT methods an adapter can train, as one table.

Each row says what trains, which of the architecture registry's module lists it targets by
default, how peft is configured for it (none: the adapter blocks' own parameters train and the
adapter is a block adapter), whether its delta folds into the model's weights (a soft prompt does
not: it travels beside the model), and what more its returned delta is checked for. Training,
verification and merging ask the table instead of branching on the method's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import IA3Config, LNTuningConfig, LoraConfig, PeftConfig, PromptTuningConfig

from offsite.artefacts.tensorcheck import all_finite
from offsite.errors import OffsiteError, VerificationError


@dataclass(frozen=True)
class Where:
    """Where a method's modules go: regexes peft full-matches, inside the adapter blocks only."""

    targets: str  # the chosen modules
    feedforward: str | list  # those of them that are feed-forward layers (IA3 scales their input)
    fan_in_fan_out: bool  # the model stores [in, out] matrices (GPT-2's Conv1D)


@dataclass(frozen=True)
class PeftMethod:
    name: str
    trains: str  # in words, for help texts and docs
    targets: str | None  # field of the registry's PeftTargets with its default modules; None: none
    config: Callable[[Any, Where], PeftConfig] | None  # None: the blocks' own parameters train
    in_weights: bool = True  # the delta folds into the model's weights
    check: Callable[[Path, Any, dict[str, torch.Tensor]], None] | None = None
    own_parameters: str | None = None  # without peft modules: which of the blocks' parameters train

    @property
    def modules(self) -> bool:
        """Whether it trains peft modules (a delta in peft's layout) rather than block parameters."""
        return self.config is not None


def _lora_products(where: Path, options, delta: dict[str, torch.Tensor]) -> None:
    """Each LoRA update (alpha / rank) B A must be finite: finite factors can still overflow."""
    scale = options.alpha / options.rank
    for name, a in delta.items():
        b = delta.get(name.replace(".lora_A.", ".lora_B.")) if ".lora_A." in name else None
        if b is not None and not all_finite((b.float() @ a.float()) * scale):  # as a merge does
            raise VerificationError(
                f"{where}: the LoRA update of {name.replace('.lora_A.weight', '')} is not finite"
            )


METHODS: dict[str, PeftMethod] = {
    m.name: m
    for m in (
        PeftMethod("lora", "low-rank updates of the blocks' linear layers", "linear",
                   lambda o, w: LoraConfig(task_type="CAUSAL_LM", r=o.rank, lora_alpha=o.alpha, lora_dropout=o.dropout,
                                           target_modules=w.targets, fan_in_fan_out=w.fan_in_fan_out),
                   check=_lora_products),
        PeftMethod("ia3", "learned scales of the attention keys, values and feed-forward inputs", "ia3",
                   lambda o, w: IA3Config(task_type="CAUSAL_LM", target_modules=w.targets,
                                          fan_in_fan_out=w.fan_in_fan_out, feedforward_modules=w.feedforward)),
        PeftMethod("ln", "the blocks' norms only", "norms",
                   lambda o, w: LNTuningConfig(task_type="CAUSAL_LM", target_modules=w.targets)),
        PeftMethod("bitfit", "the blocks' biases only", None, None, own_parameters="bias"),
        PeftMethod("prompt", "a soft prompt at the input (kept beside the model)", None,
                   lambda o, w: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=o.virtual_tokens),
                   in_weights=False),
    )
}  # fmt: skip
PEFT_METHODS = tuple(METHODS)


def method_of(name: str) -> PeftMethod:
    """The table's row for `name`, or an error listing the methods."""
    if name not in METHODS:
        raise OffsiteError(f"`method` {name!r} unknown; choose one of {', '.join(METHODS)}")
    return METHODS[name]
