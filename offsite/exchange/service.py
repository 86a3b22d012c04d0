"""The model owner's side of the exchange, without any networking: who may see which bundle,
reading bundle files from an offset, and receiving, committing and verifying adapter uploads.

The gRPC servicer (offsite/transport/server.py) only maps these calls and their errors to the wire.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from offsite.artefacts.adapter import (
    ADAPTER_MANIFEST,
    check_bundle_ids,
    open_adapter,
    spec_from_bundle,
    verify_adapter_for_bundle,
)
from offsite.artefacts.bundle import Bundle, open_bundle
from offsite.artefacts.manifest import is_safe_name
from offsite.artefacts.peft_delta import verify_delta
from offsite.artefacts.signing import load_public
from offsite.artefacts.tensorcheck import TensorSpec, spec_bytes
from offsite.atomic import atomic_directory, sha256_file
from offsite.errors import OffsiteError
from offsite.exchange.federation import check_round_adapter
from offsite.exchange.home import OwnerHome
from offsite.exchange.limits import ServiceLimits, check_stored, check_upload_quota
from offsite.exchange.pki import cert_fingerprint
from offsite.exchange.protocol import (
    ADAPTER_FILES,
    CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    PROTOCOL_VERSION,
    BadRequest,
    Busy,
    NotFound,
    Unauthenticated,
)

log = logging.getLogger(__name__)

_MANIFEST_LIMIT = 16 << 20
_FSYNC_EVERY = 16 << 20


def _upload_id(identity: str, bundle_id: str, files: list[dict]) -> str:
    # deterministic, so a client that restarts resumes the same upload
    key = json.dumps(
        [identity, bundle_id, sorted((f["name"], f["size"], f["sha256"]) for f in files)]
    )
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class OwnerService:
    """The owner's exchange service over an owner home; safe to call from many threads."""

    def __init__(
        self, home: OwnerHome, chunk_bytes: int = CHUNK_BYTES, limits: ServiceLimits | None = None
    ) -> None:
        if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise OffsiteError(f"chunk size must be 1..{MAX_CHUNK_BYTES} bytes")
        self.home = home
        self.registry = home.registry()
        self.chunk_bytes = chunk_bytes
        self.limits = limits or ServiceLimits()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._bundles: dict[str, tuple[Bundle, TensorSpec]] = {}  # verified once per process
        self._expiry = threading.Lock()
        self.at_start = {
            "expired_uploads": self.expire_uploads(),
            "removed_folders": self.sweep_folders(),
        }

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

    def still_active(self, identity: str) -> None:
        """Refuse a caller revoked while its stream runs (checked every `recheck_s` seconds)."""
        owner = self.registry.data_owner(identity)
        if owner is None or owner.revoked_at is not None:
            raise Unauthenticated(f"data owner {identity!r} was revoked; the stream is stopped")

    def _rechecking(self, identity: str) -> Callable[[], None]:
        last = time.monotonic()

        def check() -> None:
            nonlocal last
            if time.monotonic() - last >= self.limits.recheck_s:
                self.still_active(identity)
                last = time.monotonic()

        return check

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
        return self._chunks(Path(record["path"]) / name, offset, self._rechecking(identity))

    def _chunks(
        self, path: Path, offset: int, check: Callable[[], None]
    ) -> Iterator[tuple[int, bytes]]:
        with open(path, "rb") as f:
            f.seek(offset)
            while data := f.read(self.chunk_bytes):
                check()
                yield offset, data
                offset += len(data)

    # uploads
    def begin_upload(self, identity: str, bundle_id: str, files: list[dict]) -> dict:
        """Record an announced upload (or find the same one again) and report what is committed."""
        self._bundle_for(identity, bundle_id)
        names = sorted(f["name"] for f in files)
        if names not in [sorted(kind) for kind in ADAPTER_FILES.values()]:
            raise BadRequest(
                "an adapter upload must contain exactly "
                + " or exactly ".join(", ".join(sorted(kind)) for kind in ADAPTER_FILES.values())
            )
        limit = spec_bytes(self._bundle(bundle_id)[1]) + (1 << 20)
        for f in files:
            cap = limit if f["name"].endswith(".safetensors") else _MANIFEST_LIMIT
            if not 0 <= f["size"] <= cap or len(f["sha256"]) != 64:
                raise BadRequest(
                    f"{f['name']}: announced size {f['size']} or sha256 is not acceptable (limit {cap} bytes)"
                )
        upload_id = _upload_id(identity, bundle_id, files)
        self.expire_uploads()
        existing = self.registry.upload(upload_id)
        if existing is None or existing["state"] == "expired":
            check_upload_quota(self.registry, self.limits, identity, sum(f["size"] for f in files))
            check_stored(self.registry, self.limits, identity, sum(f["size"] for f in files))
        self.registry.open_upload(upload_id, identity, bundle_id, files)
        if existing is not None and existing["state"] == "expired":  # started again from zero
            self.registry.set_upload_state(upload_id, "open")
        if (
            existing is None or existing["state"] != "committed"
        ):  # open now; a committed one needs no folder
            (self.home.uploads / upload_id).mkdir(parents=True, exist_ok=True)
            self.registry.touch_upload(upload_id)
        log.info("%s began upload %s for bundle %s", identity, upload_id, bundle_id[:19])
        return self.upload_status(identity, upload_id)

    def _bundle(self, bundle_id: str) -> tuple[Bundle, TensorSpec]:
        """The issued bundle (hashes checked once per process) and the adapter spec it implies."""
        with self._locks_guard:
            cached = self._bundles.get(bundle_id)
        if cached is None:
            bundle = open_bundle(self.registry.bundle(bundle_id)["path"])
            cached = (bundle, spec_from_bundle(bundle))
            with self._locks_guard:
                self._bundles[bundle_id] = cached
        return cached

    def expire_uploads(self, now: float | None = None) -> list[str]:
        """Remove open uploads untouched for longer than the limits allow; their ids."""
        now = time.time() if now is None else now
        expired = []
        with self._expiry:
            for u in self.registry.uploads_in_state("open"):
                if now - u["touched"] > self.limits.upload_ttl_s:
                    shutil.rmtree(self.home.uploads / u["upload_id"], ignore_errors=True)
                    self.registry.set_upload_state(u["upload_id"], "expired")
                    expired.append(u["upload_id"])
        return expired

    def sweep_folders(self) -> list[str]:
        """Remove the staging folders no open upload owns (left by a crash); at start and by
        `owner cleanup` only, never while callers run (a new upload's folder would look stray)."""
        removed = []
        with self._expiry:
            open_ids = {u["upload_id"] for u in self.registry.uploads_in_state("open")}
            for folder in self.home.uploads.iterdir() if self.home.uploads.is_dir() else []:
                if folder.name not in open_ids:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder.name)
        return sorted(removed)

    def _upload(self, identity: str, upload_id: str) -> dict:
        if not upload_id.isalnum():
            raise BadRequest("malformed upload id")
        upload = self.registry.upload(upload_id)
        if upload is None or upload["data_owner"] != identity:
            raise NotFound(f"no upload {upload_id} for {identity}")
        return upload

    def upload_status(self, identity: str, upload_id: str) -> dict:
        upload = self._upload(identity, upload_id)
        if upload["state"] == "committed":  # received in full before: nothing left to send
            files = [
                {"name": f["name"], "committed": f["size"], "complete": True}
                for f in upload["files"]
            ]
            return {"upload_id": upload_id, "files": files}
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
        if upload["state"] != "open":
            raise BadRequest(
                f"upload {upload_id} is {upload['state']}; nothing more can be written to it"
            )
        self.registry.touch_upload(upload_id)
        announced = {f["name"]: f for f in upload["files"]}
        root = self.home.uploads / upload_id
        check = self._rechecking(identity)
        for name, offset, data in chunks:
            check()
            if name not in announced or not is_safe_name(name):
                raise BadRequest(f"file {name!r} is not part of upload {upload_id}")
            if len(data) > MAX_CHUNK_BYTES:
                raise BadRequest(f"chunk of {len(data)} bytes is larger than {MAX_CHUNK_BYTES}")
            with self._lock(upload_id, name):
                try:
                    self._append(root, announced[name], offset, data)
                except (
                    OSError
                ) as e:  # e.g. the folder expired meanwhile, or the disk is full: no paths
                    log.warning("upload %s: %s", upload_id, e)
                    raise Busy(f"upload {upload_id}: the owner could not store the chunk ({e.strerror}); "
                               "begin the upload again later") from None  # fmt: skip
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
        # one record per (adapter, data owner, bundle): another identity's copy, or the same adapter
        # against another bundle, gets a record of its own and never touches this one
        manifest_sha = hashlib.sha256((root / ADAPTER_MANIFEST).read_bytes()).hexdigest()
        key = json.dumps([manifest_sha, identity, upload["bundle_id"]])
        adapter_id = hashlib.sha256(key.encode()).hexdigest()[:32]
        existing = self.registry.adapter_exact(adapter_id)
        if existing is not None:
            self.registry.set_upload_state(upload_id, "committed")
            shutil.rmtree(root, ignore_errors=True)
            return {
                "adapter_id": adapter_id,
                "status": existing["status"],
                "reason": existing["reason"],
            }
        status, reason, path = "verified", "", self.home.adapters / adapter_id
        try:
            self._verify(identity, upload["bundle_id"], root)
        except (OffsiteError, RecursionError) as e:
            reason = (
                str(e).replace(str(root), "upload")
                if isinstance(e, OffsiteError)
                else "manifest nested too deeply"
            )
            status, path = "rejected", Path("")
        except Exception as e:  # never UNKNOWN with the upload held: rejected, the reason logged
            log.exception("verifying upload %s", upload_id)
            reason, status, path = (
                f"the adapter could not be verified ({type(e).__name__})",
                "rejected",
                Path(""),
            )
        if status == "verified":
            with atomic_directory(path, overwrite=True) as tmp:
                for name in ADAPTER_FILES[open_adapter(root).kind]:
                    shutil.copy2(root / name, tmp / name)
        self.registry.add_adapter(
            adapter_id, upload_id, identity, upload["bundle_id"], str(path), status, reason
        )
        self.registry.set_upload_state(upload_id, "committed")
        shutil.rmtree(root, ignore_errors=True)  # the registry keeps the reason of a rejection
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
        self._bundle_for(identity, bundle_id)
        bundle, spec = self._bundle(bundle_id)
        if (
            "federation" in bundle.manifest
        ):  # a round's bundle: refuse what the round cannot average
            check_round_adapter(adapter)
        if adapter.kind == "peft":
            check_bundle_ids(adapter, bundle)
            verify_delta(adapter, bundle)
        else:
            verify_adapter_for_bundle(adapter, bundle, spec)
