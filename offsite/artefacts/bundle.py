"""Emulator bundle: a loadable Hugging Face model directory plus a versioned, hashed manifest."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedModel

from offsite.artefacts.manifest import check_files, field, hash_files, read_manifest
from offsite.artefacts.signing import Signer, verify_file
from offsite.artefacts.tensorcheck import header_spec
from offsite.atomic import atomic_directory, write_json_atomic
from offsite.errors import OffsiteError, VerificationError
from offsite.models.architectures import get_blocks
from offsite.models.loading import from_pretrained

BUNDLE_FORMAT = "offsite-tuning/emulator-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "offsite_manifest.json"
SIGNATURE_NAME = "offsite_manifest.sig"
NOT_HASHED = (MANIFEST_NAME, SIGNATURE_NAME)
# What a bundle may hold: weights, JSON configs and tokenizer files; never pickles or code.
FILE_TYPES = (".safetensors", ".json", ".txt", ".model", ".jinja")


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

    def verify_signature(self, owner_key) -> str:
        """Check the owner's signature over the manifest; returns the signer name."""
        return verify_file(self.path / MANIFEST_NAME, self.path / SIGNATURE_NAME, owner_key)

    def load_model(self, **kwargs) -> PreTrainedModel:
        """The emulator as a plain transformers model."""
        try:
            return from_pretrained(self.path, **kwargs)
        except OffsiteError:
            raise
        except (
            Exception
        ) as e:  # the files passed their hashes, yet transformers cannot build a model
            raise VerificationError(
                f"{self.path}: cannot load the emulator ({_first_line(e)})"
            ) from None

    def load_tokenizer(self):
        """The tokenizer shipped with the bundle."""
        try:
            return AutoTokenizer.from_pretrained(self.path)
        except (
            Exception
        ) as e:  # a broken tokenizer.json raises whatever the tokenizers library raises
            raise VerificationError(
                f"{self.path}: cannot load the tokenizer ({_first_line(e)})"
            ) from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def write_bundle(
    emulator: PreTrainedModel,
    tokenizer,
    manifest: dict,
    out: str | Path,
    *,
    overwrite: bool = False,
    signer: Signer | None = None,
) -> Bundle:
    """Save `emulator` (+ tokenizer) with `manifest` (file hashes added) as a bundle, atomically."""
    if len(get_blocks(emulator)) != len(manifest["blocks"]):
        raise OffsiteError("the emulator does not have the blocks its manifest lists")
    return write_bundle_files(
        emulator.save_pretrained, tokenizer, manifest, out, overwrite=overwrite, signer=signer
    )


def write_bundle_files(
    write: Callable[[Path], dict[str, str] | None],
    tokenizer,
    manifest: dict,
    out: str | Path,
    *,
    overwrite: bool = False,
    signer: Signer | None = None,
) -> Bundle:
    """A bundle whose model files `write(tmp)` puts in place, with tokenizer and (signed) manifest.

    `write` may return the sha256 of files it hashed itself; every file is hashed once."""
    with atomic_directory(out, overwrite=overwrite) as tmp:
        known = write(tmp) or {}
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        manifest = {**manifest, "files": hash_files(tmp, NOT_HASHED, known)}
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
        if signer is not None:
            signer.sign(tmp / MANIFEST_NAME, tmp / SIGNATURE_NAME)
    return open_bundle(out, hashed=manifest["files"])  # the digests just taken of these files


def open_bundle(
    path: str | Path, hashed: dict[str, str] | None = None, weights: bool = True
) -> Bundle:
    """Read a bundle's manifest and check every file's sha256 (nothing is loaded before this passes).

    `hashed`: digests already computed by the caller over these files (see check_files).
    `weights=False`: for a caller that reads only the manifest (merging: the adapter names the
    manifest by its hash, and the emulator's weights are never read), the weight files are checked
    to be present and well-formed but not hashed.
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
    files = field(data, "files", dict, manifest_path)
    check_files(path, files, NOT_HASHED, hashed, FILE_TYPES, () if weights else (".safetensors",))
    for name in files:
        if name.endswith(".safetensors"):
            header_spec(path / name)  # a malformed or oversized header is refused before loading
    return Bundle(path, data)


def check_bundle_model(bundle: Bundle, model: PreTrainedModel) -> None:
    """The loaded emulator has as many blocks as the manifest says."""
    if len(get_blocks(model)) != len(bundle.manifest["blocks"]):
        raise VerificationError(
            f"{bundle.path}: model has {len(get_blocks(model))} blocks, manifest lists {len(bundle.manifest['blocks'])}"
        )
