"""The model owner's side of the exchange, without any networking: who may see which bundle,
reading bundle files from an offset, and receiving, committing and verifying adapter uploads.

The gRPC servicer (offsite/transport/server.py) only maps these calls and their errors to the wire.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from offsite.artefacts.adapter import (
    ADAPTER_MANIFEST,
    ADAPTER_SIGNATURE,
    WEIGHTS_NAME,
    open_adapter,
    spec_from_bundle,
    verify_adapter_for_bundle,
)
from offsite.artefacts.bundle import open_bundle
from offsite.artefacts.manifest import is_safe_name
from offsite.artefacts.signing import load_public
from offsite.atomic import atomic_directory, sha256_file
from offsite.errors import OffsiteError
from offsite.exchange.home import OwnerHome
from offsite.exchange.pki import cert_fingerprint

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 1 << 20
ADAPTER_FILES = (WEIGHTS_NAME, ADAPTER_MANIFEST, ADAPTER_SIGNATURE)
_MANIFEST_LIMIT = 16 << 20
_FSYNC_EVERY = 16 << 20


class Unauthenticated(OffsiteError):
    """The caller's certificate is unknown, revoked or replaced."""


class AccessDenied(OffsiteError):
    """The caller may not touch this bundle or upload."""


class NotFound(OffsiteError):
    """No such bundle, file or upload (for this caller)."""


class BadRequest(OffsiteError):
    """A malformed request: unsafe name, oversized chunk, wrong offset, wrong protocol version."""


def _upload_id(identity: str, bundle_id: str, files: list[dict]) -> str:
    # deterministic, so a client that restarts resumes the same upload
    key = json.dumps(
        [identity, bundle_id, sorted((f["name"], f["size"], f["sha256"]) for f in files)]
    )
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class OwnerService:
    """The owner's exchange service over an owner home; safe to call from many threads."""

    def __init__(self, home: OwnerHome, chunk_bytes: int = CHUNK_BYTES) -> None:
        if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise OffsiteError(f"chunk size must be 1..{MAX_CHUNK_BYTES} bytes")
        self.home = home
        self.registry = home.registry()
        self.chunk_bytes = chunk_bytes
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def close(self) -> None:
        self.registry.close()

    # identity
    def authenticate(self, name: str, cert_pem: bytes | None) -> str:
        """The caller's identity, if its certificate is the one enrolled under its name and not revoked."""
        owner = self.registry.data_owner(name)
        if owner is None:
            raise Unauthenticated(f"unknown data owner {name!r}")
        if owner.revoked_at is not None:
            raise Unauthenticated(f"data owner {name!r} was revoked at {owner.revoked_at}")
        if cert_pem is not None and cert_fingerprint(cert_pem) != owner.cert_sha256:
            raise Unauthenticated(f"certificate is not the one enrolled for {name!r}")
        return name

    @staticmethod
    def check_version(version: int) -> None:
        if version != PROTOCOL_VERSION:
            raise BadRequest(
                f"protocol format_version {version} is not supported (server speaks {PROTOCOL_VERSION})"
            )

    # bundles
    def list_bundles(self, identity: str) -> list[dict]:
        return self.registry.bundles_for(identity)

    def _bundle_for(self, identity: str, bundle_id: str) -> dict:
        record = self.registry.bundle(bundle_id)
        if record is None or record["data_owner"] != identity:
            # same answer for "absent" and "someone else's": no probing of other owners' bundles
            raise NotFound(f"no bundle {bundle_id[:19]}… issued to {identity}")
        return record

    def read_file(
        self, identity: str, bundle_id: str, name: str, offset: int
    ) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) chunks of one listed bundle file, from `offset` to its end."""
        record = self._bundle_for(identity, bundle_id)
        info = next((f for f in record["files"] if f["name"] == name), None)
        if info is None:
            raise NotFound(f"bundle {bundle_id[:19]}… has no file {name!r}")
        if not 0 <= offset <= info["size"]:
            raise BadRequest(f"offset {offset} is outside {name} (0..{info['size']})")
        return self._chunks(Path(record["path"]) / name, offset)

    def _chunks(self, path: Path, offset: int) -> Iterator[tuple[int, bytes]]:
        with open(path, "rb") as f:
            f.seek(offset)
            while data := f.read(self.chunk_bytes):
                yield offset, data
                offset += len(data)

    # uploads
    def begin_upload(self, identity: str, bundle_id: str, files: list[dict]) -> dict:
        """Record an announced upload (or find the same one again) and report what is committed."""
        record = self._bundle_for(identity, bundle_id)
        names = sorted(f["name"] for f in files)
        if names != sorted(ADAPTER_FILES):
            raise BadRequest(
                f"an adapter upload must contain exactly {', '.join(sorted(ADAPTER_FILES))}"
            )
        limit = sum(
            _nbytes(d, s) for d, s in spec_from_bundle(open_bundle(record["path"])).values()
        ) + (1 << 20)
        for f in files:
            cap = limit if f["name"] == WEIGHTS_NAME else _MANIFEST_LIMIT
            if not 0 <= f["size"] <= cap or len(f["sha256"]) != 64:
                raise BadRequest(
                    f"{f['name']}: announced size {f['size']} or sha256 is not acceptable (limit {cap} bytes)"
                )
        upload_id = _upload_id(identity, bundle_id, files)
        self.registry.open_upload(upload_id, identity, bundle_id, files)
        (self.home.uploads / upload_id).mkdir(parents=True, exist_ok=True)
        log.info("%s began upload %s for bundle %s", identity, upload_id, bundle_id[:19])
        return self.upload_status(identity, upload_id)

    def _upload(self, identity: str, upload_id: str) -> dict:
        if not upload_id.isalnum():
            raise BadRequest("malformed upload id")
        upload = self.registry.upload(upload_id)
        if upload is None or upload["data_owner"] != identity:
            raise NotFound(f"no upload {upload_id} for {identity}")
        return upload

    def upload_status(self, identity: str, upload_id: str) -> dict:
        upload = self._upload(identity, upload_id)
        root = self.home.uploads / upload_id
        files = []
        for f in upload["files"]:
            done = (root / f["name"]).is_file()
            part = root / (f["name"] + ".part")
            committed = f["size"] if done else (part.stat().st_size if part.exists() else 0)
            files.append({"name": f["name"], "committed": committed, "complete": done})
        return {"upload_id": upload_id, "files": files}

    def _lock(self, upload_id: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((upload_id, name), threading.Lock())

    def write(
        self, identity: str, upload_id: str, chunks: Iterator[tuple[str, int, bytes]]
    ) -> dict:
        """Append (file, offset, data) chunks; each must start at the file's committed size."""
        upload = self._upload(identity, upload_id)
        announced = {f["name"]: f for f in upload["files"]}
        root = self.home.uploads / upload_id
        for name, offset, data in chunks:
            if name not in announced or not is_safe_name(name):
                raise BadRequest(f"file {name!r} is not part of upload {upload_id}")
            if len(data) > MAX_CHUNK_BYTES:
                raise BadRequest(f"chunk of {len(data)} bytes is larger than {MAX_CHUNK_BYTES}")
            with self._lock(upload_id, name):
                self._append(root, announced[name], offset, data)
        return self.upload_status(identity, upload_id)

    def _append(self, root: Path, info: dict, offset: int, data: bytes) -> None:
        final, part = root / info["name"], root / (info["name"] + ".part")
        if final.exists():
            if offset + len(data) <= info["size"]:
                return  # a retried chunk of a finished file
            raise BadRequest(f"{info['name']} is already complete")
        committed = part.stat().st_size if part.exists() else 0
        if offset != committed:
            raise BadRequest(
                f"{info['name']}: chunk offset {offset} but {committed} bytes are committed; resume from {committed}"
            )
        if offset + len(data) > info["size"]:
            raise BadRequest(f"{info['name']}: data past the announced size {info['size']}")
        with open(part, "ab") as f:
            f.write(data)
            if f.tell() == info["size"] or f.tell() // _FSYNC_EVERY != offset // _FSYNC_EVERY:
                f.flush()
                os.fsync(f.fileno())
        if offset + len(data) == info["size"]:
            if sha256_file(part) != info["sha256"]:
                part.unlink()
                raise BadRequest(
                    f"{info['name']}: sha256 of the received bytes does not match; upload it again"
                )
            os.replace(part, final)

    def commit(self, identity: str, upload_id: str) -> dict:
        """Verify a complete upload and record the adapter (verified or rejected, with the reason)."""
        upload = self._upload(identity, upload_id)
        root = self.home.uploads / upload_id
        if upload["state"] == "committed":
            return self._adapter_of(upload_id)
        missing = [f["name"] for f in upload["files"] if not (root / f["name"]).is_file()]
        if missing:
            raise BadRequest(f"upload {upload_id} is not complete: {', '.join(missing)}")
        adapter_id = hashlib.sha256((root / ADAPTER_MANIFEST).read_bytes()).hexdigest()[:32]
        status, reason, path = "verified", "", self.home.adapters / adapter_id
        try:
            self._verify(identity, upload["bundle_id"], root)
        except OffsiteError as e:
            status, reason, path = "rejected", str(e).replace(str(root), "upload"), root
        if status == "verified" and not path.exists():
            with atomic_directory(path) as tmp:
                for name in ADAPTER_FILES:
                    shutil.copy2(root / name, tmp / name)
        self.registry.add_adapter(
            adapter_id, upload_id, identity, upload["bundle_id"], str(path), status, reason
        )
        self.registry.set_upload_state(upload_id, "committed")
        if (
            status == "verified"
        ):  # the adapter now lives in adapters/; rejected uploads stay as evidence
            shutil.rmtree(root, ignore_errors=True)
        log.info("%s committed adapter %s: %s %s", identity, adapter_id, status, reason)
        return {"adapter_id": adapter_id, "status": status, "reason": reason}

    def _adapter_of(self, upload_id: str) -> dict:
        for a in self.registry.adapters():
            if a["upload_id"] == upload_id:
                return {"adapter_id": a["adapter_id"], "status": a["status"], "reason": a["reason"]}
        raise NotFound(f"upload {upload_id} has no adapter record")

    def _verify(self, identity: str, bundle_id: str, root: Path) -> None:
        owner = self.registry.data_owner(identity)
        adapter = open_adapter(root)
        adapter.verify_signature(
            load_public(owner.signing_key.encode(), f"registry key of {identity}")
        )
        bundle = open_bundle(self._bundle_for(identity, bundle_id)["path"])
        verify_adapter_for_bundle(adapter, bundle)


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of this dtype name (as in tensorcheck, e.g. 'float32') and shape takes."""
    torch_dtype = getattr(torch, dtype, None)
    size = (
        torch.empty(0, dtype=torch_dtype).element_size()
        if isinstance(torch_dtype, torch.dtype)
        else 2
    )
    return math.prod(shape) * size
