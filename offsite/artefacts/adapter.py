"""Adapter artefact: trained adapter blocks keyed by the full model's parameter names."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel

from offsite import __version__
from offsite.artefacts.bundle import Bundle
from offsite.artefacts.manifest import check_files, field, hash_files, read_manifest
from offsite.artefacts.signing import Signer, verify_file
from offsite.artefacts.tensorcheck import TensorSpec, check_spec, header_spec, load_checked, spec_of
from offsite.atomic import atomic_directory, write_json_atomic
from offsite.errors import OffsiteError, VerificationError
from offsite.models.architectures import block_prefix, get_blocks

ADAPTER_FORMAT = "offsite-tuning/adapter"
ADAPTER_FORMAT_VERSION = 1
ADAPTER_MANIFEST = "adapter_manifest.json"
ADAPTER_SIGNATURE = "adapter_manifest.sig"
WEIGHTS_NAME = "adapter.safetensors"
PEFT_WEIGHTS = (
    "adapter_model.safetensors"  # peft's own names, so PeftModel.from_pretrained reads them
)
PEFT_CONFIG = "adapter_config.json"
NOT_HASHED = (ADAPTER_MANIFEST, ADAPTER_SIGNATURE)
# what each kind of adapter carries besides its manifest and signature: whole adapter blocks, or
# a PEFT delta in peft's layout (LoRA, IA3, LN tuning, prompt tuning)
PAYLOADS = {"blocks": (WEIGHTS_NAME,), "peft": (PEFT_WEIGHTS, PEFT_CONFIG)}
# which tensors of the adapter blocks a block adapter carries: all, or the biases only (BitFit)
TRAINED = ("all", "bias")


def only_trained(spec: dict, trained: str) -> dict:
    """The entries of `spec` (names -> anything) that an adapter training `trained` carries."""
    return {k: v for k, v in spec.items() if trained == "all" or k.endswith(".bias")}


@dataclass(frozen=True)
class Adapter:
    """An adapter directory whose manifest has been read and whose file hashes have been checked."""

    path: Path
    manifest: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.manifest.get("kind", "blocks")

    @property
    def trained(self) -> str:
        return self.manifest.get("trained", "all")

    @property
    def weights(self) -> Path:
        return self.path / PAYLOADS[self.kind][0]

    @property
    def blocks(self) -> list[int]:
        return list(self.manifest["adapter_blocks"])

    def verify_signature(self, key) -> str:
        """Check the data owner's signature over the manifest; returns the signer name."""
        return verify_file(self.path / ADAPTER_MANIFEST, self.path / ADAPTER_SIGNATURE, key)

    @property
    def spec(self) -> TensorSpec:
        return {k: (v["dtype"], tuple(v["shape"])) for k, v in self.manifest["tensors"].items()}


def remap_blocks(
    state: dict[str, torch.Tensor],
    prefix: str,
    mapping: dict[int, int],
    *,
    keep_others: bool = False,
) -> dict[str, torch.Tensor]:
    """Rename '<prefix>.<i>.rest' to '<prefix>.<mapping[i]>.rest'. A key in a block outside
    `mapping` is an error; so is a key outside the blocks, unless `keep_others` (kept as it is)."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    out = {}
    for key, value in state.items():
        m = pattern.match(key)
        if not m and keep_others:
            out[key] = value
            continue
        if not m or int(m.group(1)) not in mapping:
            raise VerificationError(f"tensor {key} is not in an adapter block")
        out[f"{prefix}.{mapping[int(m.group(1))]}.{m.group(2)}"] = value
    return out


def block_parameters(model: PreTrainedModel, positions: list[int]) -> dict[str, torch.Tensor]:
    """Parameters of the blocks at `positions`, keyed by the model's own parameter names."""
    prefix = block_prefix(model.config.model_type)
    blocks = get_blocks(model)
    return {
        f"{prefix}.{i}.{name}": p for i in positions for name, p in blocks[i].named_parameters()
    }


def extract_adapter(
    emulator: PreTrainedModel, bundle: Bundle, trained: str = "all"
) -> dict[str, torch.Tensor]:
    """The emulator's adapter blocks (`trained`: all their tensors, or the biases), renamed to the
    full model's parameter names."""
    prefix = bundle.manifest["base_model"]["block_prefix"]
    state = only_trained(block_parameters(emulator, bundle.adapter_positions), trained)
    mapping = {b["index"]: b["source"] for b in bundle.manifest["blocks"] if b["role"] == "adapter"}
    return {
        k: v.detach().cpu().contiguous() for k, v in remap_blocks(state, prefix, mapping).items()
    }


def save_adapter(
    state: dict[str, torch.Tensor],
    bundle: Bundle,
    out: str | Path,
    *,
    training: dict,
    overwrite: bool = False,
    signer: Signer | None = None,
    peft: tuple[dict, dict] | None = None,
    trained: str = "all",
) -> Adapter:
    """Write adapter weights and a manifest naming the bundle they were trained from, atomically.

    `peft`: (the PEFT options, peft's config dict) when `state` is a PEFT delta."""
    manifest = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "offsite_version": __version__,
        "bundle_id": bundle.bundle_id,
        "base_fingerprint": bundle.base_fingerprint,
        "model_type": bundle.manifest["base_model"]["model_type"],
        "block_prefix": bundle.manifest["base_model"]["block_prefix"],
        "adapter_blocks": bundle.adapter_sources,
        "tensors": {k: {"dtype": d, "shape": list(s)} for k, (d, s) in spec_of(state).items()},
        "training": training,
        "signer": signer.name if signer is not None else None,
    }
    if peft is not None:
        manifest.update(kind="peft", peft=peft[0])
    if trained != "all":
        manifest["trained"] = trained
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_file(
            state, str(tmp / PAYLOADS[manifest.get("kind", "blocks")][0]), metadata={"format": "pt"}
        )
        if peft is not None:
            write_json_atomic(tmp / PEFT_CONFIG, peft[1])
        manifest["files"] = hash_files(tmp, NOT_HASHED)
        write_json_atomic(tmp / ADAPTER_MANIFEST, manifest)
        if signer is not None:
            signer.sign(tmp / ADAPTER_MANIFEST, tmp / ADAPTER_SIGNATURE)
    return open_adapter(out)


def open_adapter(path: str | Path) -> Adapter:
    """Read an adapter manifest and check its file hashes."""
    path = Path(path)
    if not path.is_dir():
        raise OffsiteError(f"{path}: adapter directory not found")
    mpath = path / ADAPTER_MANIFEST
    data = read_manifest(mpath, ADAPTER_FORMAT, ADAPTER_FORMAT_VERSION)
    for key, typ in (
        ("bundle_id", str),
        ("base_fingerprint", str),
        ("block_prefix", str),
        ("adapter_blocks", list),
        ("tensors", dict),
    ):
        field(data, key, typ, mpath)
    for name, t in data["tensors"].items():
        if (
            not isinstance(t, dict)
            or not isinstance(t.get("dtype"), str)
            or not isinstance(t.get("shape"), list)
        ):
            raise VerificationError(f"{mpath}: tensors[{name!r}] needs 'dtype' and 'shape'")
    files = field(data, "files", dict, mpath)
    kind = data.get("kind", "blocks")
    if kind not in PAYLOADS:
        raise VerificationError(
            f"{mpath}: unknown adapter kind {kind!r} (known: {', '.join(PAYLOADS)})"
        )
    if kind == "peft":
        field(data, "peft", dict, mpath)
    if data.get("trained", "all") not in TRAINED:
        raise VerificationError(f"{mpath}: 'trained' must be one of {', '.join(TRAINED)}")
    for name in PAYLOADS[kind]:
        if name not in files:
            raise VerificationError(f"{mpath}: 'files' does not list {name}")
    check_files(
        path, files, NOT_HASHED, suffixes=tuple({n[n.rindex(".") :] for n in PAYLOADS[kind]})
    )
    return Adapter(path, data)


def expected_spec(full_model: PreTrainedModel, blocks: list[int]) -> TensorSpec:
    """What an adapter for `blocks` of this full model must contain."""
    return spec_of(block_parameters(full_model, blocks))


@torch.no_grad()
def plug_adapter(
    model: PreTrainedModel,
    state: dict[str, torch.Tensor],
    *,
    positions: dict[int, int] | None = None,
) -> None:
    """Copy adapter tensors into `model` in place; `positions` maps full-model block -> model block."""
    prefix = block_prefix(model.config.model_type)
    if positions is not None:
        state = remap_blocks(state, prefix, positions)
    params = dict(model.named_parameters())
    for name, value in state.items():
        if name not in params:
            raise VerificationError(f"tensor {name} has no matching parameter in the model")
        target = params[name]
        if target.shape != value.shape:
            raise VerificationError(
                f"tensor {name} has shape {list(value.shape)}, model expects {list(target.shape)}"
            )
        target.copy_(value.to(target.dtype))


def plug_into_emulator(emulator: PreTrainedModel, bundle: Bundle, adapter: Adapter) -> None:
    """Load a (verified) adapter into a bundle's emulator, e.g. to evaluate emulator fine-tuned."""
    if adapter.manifest["bundle_id"] != bundle.bundle_id:
        raise VerificationError(
            f"{adapter.path}: adapter was not trained from bundle {bundle.path}"
        )
    expected = spec_of(extract_adapter(emulator, bundle, adapter.trained))
    check_spec(str(adapter.path / ADAPTER_MANIFEST), adapter.spec, expected)
    state = load_checked(adapter.path / WEIGHTS_NAME, expected)
    mapping = {b["source"]: b["index"] for b in bundle.manifest["blocks"] if b["role"] == "adapter"}
    plug_adapter(emulator, state, positions=mapping)


def spec_from_bundle(bundle: Bundle) -> TensorSpec:
    """What an adapter for `bundle` must contain, read from the bundle's safetensors headers only."""
    prefix = bundle.manifest["base_model"]["block_prefix"]
    mapping = {b["index"]: b["source"] for b in bundle.manifest["blocks"] if b["role"] == "adapter"}
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    spec: TensorSpec = {}
    for path in sorted(bundle.path.glob("*.safetensors")):
        for name, entry in header_spec(path).items():
            m = pattern.match(name)
            if m and int(m.group(1)) in mapping:
                spec[f"{prefix}.{mapping[int(m.group(1))]}.{name[m.end() :]}"] = entry
    return spec


def verify_adapter_for_bundle(
    adapter: Adapter, bundle: Bundle, expected: TensorSpec | None = None
) -> dict[str, torch.Tensor]:
    """Check an adapter against the bundle it claims (ids, key set, shapes, dtypes, finite values);
    `expected`: `spec_from_bundle(bundle)`, if the caller already has it."""
    check_bundle_ids(adapter, bundle)
    expected = only_trained(
        expected if expected is not None else spec_from_bundle(bundle), adapter.trained
    )
    check_spec(str(adapter.path / ADAPTER_MANIFEST), adapter.spec, expected)
    return load_checked(adapter.path / WEIGHTS_NAME, expected)


def check_bundle_ids(adapter: Adapter, bundle: Bundle) -> None:
    """The adapter names this bundle, its base model and its adapter blocks."""
    m = adapter.manifest
    if m["bundle_id"] != bundle.bundle_id:
        raise VerificationError(
            f"{adapter.path}: adapter names bundle {m['bundle_id'][:19]}…, not {bundle.bundle_id[:19]}…"
        )
    if (
        m["base_fingerprint"] != bundle.base_fingerprint
        or m["adapter_blocks"] != bundle.adapter_sources
    ):
        raise VerificationError(
            f"{adapter.path}: base fingerprint or adapter blocks differ from the bundle's"
        )
