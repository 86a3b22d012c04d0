"""`owner package-emulator`: full model in, emulator bundle out (the manifest records the plan)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from offsite.artefacts.bundle import Bundle
from offsite.artefacts.signing import Signer
from offsite.atomic import check_apart, check_output_dir
from offsite.emulator.bundling import PackageSpec, bundle_manifest, package_emulator
from offsite.emulator.recipe import make_emulator
from offsite.emulator.recipe_file import recipe_record
from offsite.emulator.streamed import package_streaming
from offsite.models.architectures import num_blocks
from offsite.models.loading import load_model, load_tokenizer
from offsite.training.config import StepInfo

__all__ = ["PackageSpec", "bundle_manifest", "package", "package_emulator"]


def package(
    spec: PackageSpec,
    *,
    signer: Signer | None = None,
    extra: dict | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> Bundle:
    """Load the full model, choose and build the emulator, write the (signed) bundle."""
    check_output_dir(spec.out, spec.overwrite)  # fail before loading and distilling, not after
    model_dir = spec.model if Path(spec.model).exists() else None
    r = spec.recipe
    check_apart({"`out`": spec.out, "`checkpoint_dir`": r.checkpoint_dir}, {"`model`": model_dir},
                {"`selection_data`": r.selection_data, "`distill_data`": r.distill_data})  # fmt: skip
    if spec.stream:
        return package_streaming(spec, signer=signer, extra=extra)
    model = load_model(spec.model, dtype=spec.dtype)
    tokenizer = load_tokenizer(spec.model)
    plan = spec.plan(num_blocks(model.config))
    emulator, plan, record = make_emulator(model, tokenizer, plan, spec.recipe, on_step=on_step)
    record["recipe"] = recipe_record(spec.recipe)
    return package_emulator(model, tokenizer, plan, spec.out, base_name=spec.model, overwrite=spec.overwrite,
                            signer=signer, extra={"emulator_recipe": record, **(extra or {})},
                            emulator=emulator)  # fmt: skip
