"""Emulator bundle: a loadable Hugging Face model directory plus a versioned, hashed manifest."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from offsite import __version__
from offsite.artefacts.manifest import check_files, field, hash_files, read_manifest
from offsite.artefacts.signing import Signer, verify_file
from offsite.atomic import atomic_directory, write_json_atomic
from offsite.emulator.build import build_emulator
from offsite.emulator.plan import SplitPlan
from offsite.errors import OffsiteError, VerificationError
from offsite.models.architectures import block_prefix, get_blocks
from offsite.models.fingerprint import model_fingerprint
from offsite.models.loading import from_pretrained

BUNDLE_FORMAT = "offsite-tuning/emulator-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "offsite_manifest.json"
SIGNATURE_NAME = "offsite_manifest.sig"
NOT_HASHED = (MANIFEST_NAME, SIGNATURE_NAME)


@dataclass(frozen=True)
class Bundle:
    """A bundle directory whose manifest has been read and whose files have been checked."""

    path: Path
    manifest: dict[str, Any]

    @property
    def bundle_id(self) -> str:
        """sha256 of the manifest bytes: names this exact bundle."""
        return "sha256:" + hashlib.sha256((self.path / MANIFEST_NAME).read_bytes()).hexdigest()

    @property
    def base_fingerprint(self) -> str:
        return self.manifest["base_model"]["fingerprint"]

    @property
    def source_indices(self) -> list[int]:
        """Original (full-model) index of each bundle block, in bundle order."""
        return [b["source"] for b in self.manifest["blocks"]]

    @property
    def adapter_positions(self) -> list[int]:
        """Bundle-local indices of the trainable adapter blocks."""
        return [b["index"] for b in self.manifest["blocks"] if b["role"] == "adapter"]

    @property
    def adapter_sources(self) -> list[int]:
        """Full-model indices of the adapter blocks."""
        return [b["source"] for b in self.manifest["blocks"] if b["role"] == "adapter"]

    @property
    def plan(self) -> SplitPlan:
        """The split plan this bundle was made with."""
        e = self.manifest["emulator"]
        return SplitPlan(self.manifest["base_model"]["num_layers"], tuple(self.adapter_sources),
                         tuple(e["kept"]), e.get("strategy", "uniform"))  # fmt: skip

    def verify_signature(self, owner_key) -> str:
        """Check the owner's signature over the manifest; returns the signer name."""
        return verify_file(self.path / MANIFEST_NAME, self.path / SIGNATURE_NAME, owner_key)

    def load_model(self, **kwargs) -> PreTrainedModel:
        """The emulator as a plain transformers model."""
        return from_pretrained(self.path, **kwargs)


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
    fingerprint = model_fingerprint(model)
    manifest = bundle_manifest(model, plan, base_name, fingerprint, extra)
    if emulator is None:
        emulator = build_emulator(model, plan, inplace=inplace)
    elif len(get_blocks(emulator)) != len(plan.emulator_order):
        raise OffsiteError("the prepared emulator does not have the plan's blocks")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        emulator.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        manifest["files"] = hash_files(tmp, NOT_HASHED)
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
        if signer is not None:
            signer.sign(tmp / MANIFEST_NAME, tmp / SIGNATURE_NAME)
    return open_bundle(out)


def open_bundle(path: str | Path, hashed: dict[str, str] | None = None) -> Bundle:
    """Read a bundle's manifest and check every file's sha256 (nothing is loaded before this passes).

    `hashed`: digests already computed by the caller over these files (see check_files).
    """
    path = Path(path)
    if not path.is_dir():
        raise OffsiteError(f"{path}: bundle directory not found")
    manifest_path = path / MANIFEST_NAME
    data = read_manifest(manifest_path, BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION)
    base = field(data, "base_model", dict, manifest_path)
    for key, typ in (
        ("fingerprint", str),
        ("model_type", str),
        ("num_layers", int),
        ("block_prefix", str),
    ):
        field(base, key, typ, manifest_path)
    blocks = field(data, "blocks", list, manifest_path)
    for i, b in enumerate(blocks):
        if (
            not isinstance(b, dict)
            or b.get("index") != i
            or b.get("role") not in ("adapter", "emulator")
        ):
            raise VerificationError(f"{manifest_path}: blocks[{i}] is malformed")
        if not isinstance(b.get("source"), int) or not 0 <= b["source"] < base["num_layers"]:
            raise VerificationError(f"{manifest_path}: blocks[{i}].source is out of range")
    check_files(path, field(data, "files", dict, manifest_path), NOT_HASHED, hashed)
    return Bundle(path, data)


def check_bundle_model(bundle: Bundle, model: PreTrainedModel) -> None:
    """The loaded emulator has as many blocks as the manifest says."""
    if len(get_blocks(model)) != len(bundle.manifest["blocks"]):
        raise VerificationError(
            f"{bundle.path}: model has {len(get_blocks(model))} blocks, manifest lists {len(bundle.manifest['blocks'])}"
        )
