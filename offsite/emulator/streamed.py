"""`package-emulator --stream`: the bundle built from the model's safetensors files, never the
whole model in memory.

Every tensor the emulator keeps unchanged (embeddings, final norm, head, adapter blocks, kept
middle blocks, renumbered) is byte-copied from the files into shards with the standard index.
Redundancy selection and layer-wise fitting run block by block (`blockwise`): one block in
memory at a time, the fitted blocks written to a scratch file inside the bundle's temporary
directory and copied from there. What needs the whole model at once is refused with the reason.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from offsite.artefacts.bundle import Bundle, write_bundle_files
from offsite.artefacts.shards import (
    file_entries,
    is_sharded_dir,
    meta_model,
    state_names,
    stream_fingerprint,
    tensor_map,
    write_entries,
)
from offsite.artefacts.signing import Signer
from offsite.atomic import sha256_file
from offsite.emulator.blockwise import (
    BlockwiseModel,
    block_stats_blockwise,
    distill_layerwise_blockwise,
    save_block_file,
)
from offsite.emulator.build import check_plan_fits
from offsite.emulator.bundling import PackageSpec, bundle_manifest
from offsite.emulator.plan import SplitPlan
from offsite.emulator.recipe import owner_sample
from offsite.emulator.recipe_file import recipe_record
from offsite.emulator.selection import select_recorded
from offsite.errors import OffsiteError
from offsite.models.architectures import block_prefix, num_blocks, set_blocks
from offsite.models.loading import load_tokenizer, local_path, resolve_model

NOT_MEASURED = (
    "the transfer score needs gradients through the whole model; not measured when streamed"
)


def why_not_streamed(spec: PackageSpec, source: Path) -> str | None:
    """Why this spec cannot be packaged from the files alone, or None."""
    r = spec.recipe
    lw = r.layerwise
    needs = [("`selection` similarity (it compares every block's outputs at once)", r.selection == "similarity"),
             ("layer-wise noise or gradient matching", lw is not None and bool(lw.noise or lw.grad_weight)),
             ("`distill_data`", r.distill_data is not None), ("`prune`", bool(r.prune)),
             ("`quantize_bits`", r.quantize_bits is not None), ("`harmonizer`", r.harmonizer is not None)]  # fmt: skip
    if not is_sharded_dir(source):
        return f"`model` {spec.model} is not a directory of safetensors files"
    if spec.dtype is not None:
        return "`dtype` converts the weights, which needs them loaded"
    for name, needed in needs:
        if needed:
            return f"{name} runs the full model, which needs it in memory"
    return None


def package_streaming(
    spec: PackageSpec, *, signer: Signer | None = None, extra: dict | None = None
) -> Bundle:
    """The bundle built tensor by tensor from the model's safetensors files; selection and
    layer-wise fitting run one block at a time."""
    resolved = resolve_model(spec.model)
    if resolved.gguf_file is not None:
        raise OffsiteError(
            f"`stream`: {resolved.gguf_file} is a GGUF file, dequantised to bfloat16 when loaded; "
            "package without `stream`"
        )
    source = Path(local_path(resolved))
    why = why_not_streamed(spec, source)
    if why is not None:
        raise OffsiteError(f"`stream`: {why}; package without `stream`")
    model = meta_model(source)
    plan = spec.plan(num_blocks(model.config))
    check_plan_fits(model, plan)
    names = state_names(source)  # NotStreamable now if the files name tensors otherwise
    tokenizer, r = load_tokenizer(spec.model), spec.recipe
    record: dict = {
        "selection": {"strategy": plan.strategy},
        "transfer_score": None,
        "streamed": NOT_MEASURED,
        "recipe": recipe_record(r),
    }
    blockwise = sample = None
    if r.selection == "redundancy" or r.layerwise is not None:
        blockwise = BlockwiseModel(source)
        sample = owner_sample(r, tokenizer)
    if r.selection == "redundancy":
        plan = select_recorded(plan, "redundancy", block_stats_blockwise(blockwise, sample), record)
    record["selection"].update(strategy=plan.strategy, kept=list(plan.kept))
    prefix = block_prefix(model.config.model_type)
    position = {src: i for i, src in enumerate(plan.emulator_order)}
    renames = _renames(tensor_map(source), prefix, position)
    set_blocks(model, list(plan.emulator_order))  # the emulator's config: depth and per-layer lists
    manifest = bundle_manifest(model, plan, spec.model, "", {"emulator_recipe": record, **(extra or {})})  # fmt: skip

    def write(tmp: Path) -> dict[str, str]:
        with ThreadPoolExecutor(1) as pool:  # the full model is hashed while the bundle is built
            hashing = pool.submit(stream_fingerprint, source, names)
            model.config.save_pretrained(tmp)
            if model.generation_config is not None and (source / "generation_config.json").is_file():  # fmt: skip
                model.generation_config.save_pretrained(tmp)
            stored = tensor_map(source)
            tensors = {new: stored[old] for new, old in sorted(renames.items())}
            scratch = tmp / ".fitted"
            if r.layerwise is not None:
                manifest["emulator_recipe"]["layerwise"] = _fit(blockwise, plan, sample, r, scratch, prefix, position)  # fmt: skip
                tensors.update(_fitted(scratch, tensors))
            write_entries(tmp, tensors)
            shutil.rmtree(scratch, ignore_errors=True)
            # the bundle's weights are hashed while the full model's fingerprint still runs
            digests = {p.name: sha256_file(p) for p in sorted(tmp.glob("*.safetensors"))}
            # filled in before write_bundle_files writes the manifest
            manifest["base_model"]["fingerprint"] = hashing.result()
            return digests

    return write_bundle_files(write, tokenizer, manifest, spec.out, overwrite=spec.overwrite, signer=signer)  # fmt: skip


def _renames(stored: dict, prefix: str, position: dict[int, int]) -> dict[str, str]:
    """Bundle name -> stored name of every tensor the emulator keeps (kept blocks renumbered)."""
    renames = {}
    for name in stored:
        block, _, rest = name.removeprefix(prefix + ".").partition(".")
        if not name.startswith(prefix + ".") or not block.isdigit():
            renames[name] = name
        elif int(block) in position:
            renames[f"{prefix}.{position[int(block)]}.{rest}"] = name
    return renames


def _fit(blockwise, plan: SplitPlan, sample, recipe, scratch: Path, prefix: str, position) -> dict:
    scratch.mkdir()
    t0 = time.perf_counter()
    record = distill_layerwise_blockwise(blockwise, plan, sample, recipe.layerwise, save_block_file(scratch, prefix, position))  # fmt: skip
    record["seconds"] = round(time.perf_counter() - t0, 1)
    record["kept"] = "fitted (streamed: not compared with the plain drop, see transfer_score)"
    return record


def _fitted(scratch: Path, tensors: dict) -> dict:
    """The fitted blocks' tensors, each replacing the stored one of the same name."""
    fitted = {
        n: e
        for path in sorted(scratch.glob("*.safetensors"))
        for n, e in file_entries(path).items()
    }
    for name, e in fitted.items():
        old = tensors.get(name)
        if old is None or (old.dtype, old.shape) != (e.dtype, e.shape):
            raise OffsiteError(f"fitted tensor {name} does not match the stored one; a bug, please report it")  # fmt: skip
    return fitted
