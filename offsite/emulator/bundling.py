"""The emulator bundle of a split model: its manifest, writing it, and what `package-emulator` asks for."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from offsite import __version__
from offsite.artefacts.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    Bundle,
    write_bundle,
)
from offsite.artefacts.signing import Signer
from offsite.emulator.build import build_emulator
from offsite.emulator.plan import SplitPlan, make_plan
from offsite.emulator.recipe import EmulatorRecipe
from offsite.models.architectures import block_prefix
from offsite.models.fingerprint import model_fingerprint
from offsite.models.loading import DEFAULT_MODEL


def bundle_manifest(
    model: PreTrainedModel, plan: SplitPlan, base_name: str, fingerprint: str, extra: dict | None
) -> dict:
    """The manifest (without file hashes) describing `plan` applied to `model`."""
    adapter = set(plan.adapter)
    blocks = [
        {"index": i, "source": src, "role": "adapter" if src in adapter else "emulator"}
        for i, src in enumerate(plan.emulator_order)
    ]
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "offsite_version": __version__,
        "base_model": {
            "name": base_name,
            "fingerprint": fingerprint,
            "model_type": model.config.model_type,
            "num_layers": plan.num_layers,
            "block_prefix": block_prefix(model.config.model_type),
        },
        "blocks": blocks,
        "emulator": {
            "strategy": plan.strategy,
            "kept": list(plan.kept),
            "dropped": list(plan.dropped),
        },
        **(extra or {}),
    }


def package_emulator(
    model: PreTrainedModel,
    tokenizer,
    plan: SplitPlan,
    out: str | Path,
    *,
    base_name: str,
    overwrite: bool = False,
    extra: dict | None = None,
    inplace: bool = False,
    signer: Signer | None = None,
    emulator: PreTrainedModel | None = None,
) -> Bundle:
    """Write the emulator for `plan` as a bundle directory (signed if `signer`), atomically.

    The emulator is built from `model` unless a prepared one (e.g. distilled) is passed.
    """
    manifest = bundle_manifest(model, plan, base_name, model_fingerprint(model), extra)
    if emulator is None:
        emulator = build_emulator(model, plan, inplace=inplace)
    return write_bundle(emulator, tokenizer, manifest, out, overwrite=overwrite, signer=signer)


@dataclass(frozen=True)
class PackageSpec:
    """What `owner package-emulator` builds: which model, which split, which emulator recipe."""

    out: Path
    model: str = DEFAULT_MODEL
    adapter_bottom: int = 2
    adapter_top: int = 2
    adapter_blocks: tuple[int, ...] | None = None
    emulator_layers: int | None = None
    drop_ratio: float | None = None
    emulator_blocks: tuple[int, ...] | None = None
    recipe: EmulatorRecipe = field(default_factory=EmulatorRecipe)
    dtype: torch.dtype | None = None
    overwrite: bool = False
    stream: bool = False  # build the bundle tensor by tensor from the model's safetensors files

    def plan(self, depth: int) -> SplitPlan:
        """The split of a `depth`-block model this spec asks for (before any selection)."""
        return make_plan(
            depth,
            adapter_bottom=self.adapter_bottom, adapter_top=self.adapter_top, adapter_blocks=self.adapter_blocks,
            emulator_layers=self.emulator_layers, drop_ratio=self.drop_ratio, kept_blocks=self.emulator_blocks,
        )  # fmt: skip
