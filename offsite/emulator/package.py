"""`owner package-emulator`: full model in, emulator bundle out (the manifest records the plan)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
    write_bundle_files,
)
from offsite.artefacts.shards import (
    is_sharded_dir,
    meta_model,
    state_names,
    stream_fingerprint,
    tensor_map,
    write_renamed,
)
from offsite.artefacts.signing import Signer
from offsite.atomic import check_apart, check_output_dir
from offsite.emulator.build import build_emulator, check_plan_fits
from offsite.emulator.plan import SplitPlan, make_plan
from offsite.emulator.recipe import EmulatorRecipe, make_emulator
from offsite.errors import OffsiteError
from offsite.models.architectures import block_prefix, num_blocks, set_blocks
from offsite.models.fingerprint import model_fingerprint
from offsite.models.loading import (
    DEFAULT_MODEL,
    load_model,
    load_tokenizer,
    local_path,
    resolve_model,
)
from offsite.training.loop import StepInfo


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
    check_apart({"--out": spec.out, "--checkpoint-dir": r.checkpoint_dir}, {"--model": model_dir},
                {"--selection-data": r.selection_data, "--distill-data": r.distill_data})  # fmt: skip
    if spec.stream:
        return package_streaming(spec, signer=signer, extra=extra)
    model = load_model(spec.model, dtype=spec.dtype)
    tokenizer = load_tokenizer(spec.model)
    plan = _plan(spec, num_blocks(model.config))
    emulator, plan, record = make_emulator(model, tokenizer, plan, spec.recipe, on_step=on_step)
    return package_emulator(model, tokenizer, plan, spec.out, base_name=spec.model, overwrite=spec.overwrite,
                            signer=signer, extra={"emulator_recipe": record, **(extra or {})},
                            emulator=emulator)  # fmt: skip


def _plan(spec: PackageSpec, depth: int) -> SplitPlan:
    return make_plan(
        depth,
        adapter_bottom=spec.adapter_bottom, adapter_top=spec.adapter_top, adapter_blocks=spec.adapter_blocks,
        emulator_layers=spec.emulator_layers, drop_ratio=spec.drop_ratio, kept_blocks=spec.emulator_blocks,
    )  # fmt: skip


def _why_not_streamed(spec: PackageSpec, source: Path) -> str | None:
    r = spec.recipe
    needs = [("--selection " + r.selection, r.selection in ("redundancy", "similarity") and spec.emulator_blocks is None),
             ("layer-wise fitting (--layerwise-steps 0 turns it off)", r.layerwise is not None),
             ("--distill-data", r.distill_data is not None), ("--prune", bool(r.prune)),
             ("--quantize-bits", r.quantize_bits is not None)]  # fmt: skip
    if not is_sharded_dir(source):
        return f"--model {spec.model} is not a directory of safetensors files"
    if spec.dtype is not None:
        return "--dtype converts the weights, which needs them loaded"
    for name, needed in needs:
        if needed:
            return f"{name} runs the full model, which needs it in memory"
    return None


def package_streaming(
    spec: PackageSpec, *, signer: Signer | None = None, extra: dict | None = None
) -> Bundle:
    """The bundle built tensor by tensor from the model's safetensors files (byte-copied, renamed),
    never the whole model in memory. For recipes that need no forward pass through the full model."""
    resolved = resolve_model(spec.model)
    if resolved.gguf_file is not None:
        raise OffsiteError(
            f"--stream: {resolved.gguf_file} is a GGUF file, dequantised to bfloat16 when loaded; "
            "package without --stream"
        )
    source = Path(local_path(resolved))
    why = _why_not_streamed(spec, source)
    if why is not None:
        raise OffsiteError(f"--stream: {why}; package without --stream")
    model = meta_model(source)
    plan = _plan(spec, num_blocks(model.config))
    check_plan_fits(model, plan)
    # NotStreamable now if the files name tensors otherwise than the model
    names = state_names(source)
    prefix = block_prefix(model.config.model_type)
    position = {src: i for i, src in enumerate(plan.emulator_order)}
    renames = {}
    for name in tensor_map(source):
        block, _, rest = name.removeprefix(prefix + ".").partition(".")
        if not name.startswith(prefix + ".") or not block.isdigit():
            renames[name] = name
        elif int(block) in position:
            renames[f"{prefix}.{position[int(block)]}.{rest}"] = name
    set_blocks(model, list(plan.emulator_order))  # the emulator's config: depth and per-layer lists
    record = {"selection": {"strategy": plan.strategy, "kept": list(plan.kept)}, "transfer_score": None,
              "streamed": "built tensor by tensor; the transfer score needs forward passes and was not measured"}  # fmt: skip
    manifest = bundle_manifest(
        model, plan, spec.model, "", {"emulator_recipe": record, **(extra or {})}
    )
    tokenizer = load_tokenizer(spec.model)

    def write(tmp: Path) -> None:
        with ThreadPoolExecutor(1) as pool:  # the full model is hashed while the kept tensors copy
            hashing = pool.submit(stream_fingerprint, source, names)
            model.config.save_pretrained(tmp)
            if (
                model.generation_config is not None
                and (source / "generation_config.json").is_file()
            ):
                model.generation_config.save_pretrained(tmp)
            write_renamed(source, tmp, dict(sorted(renames.items())))
            # filled in before write_bundle_files writes the manifest
            manifest["base_model"]["fingerprint"] = hashing.result()

    return write_bundle_files(
        write, tokenizer, manifest, spec.out, overwrite=spec.overwrite, signer=signer
    )
