"""The data owner's gRPC client: a context manager yielding plain callables (no grpc outside).

    with connect("localhost:50051", credentials) as owner:
        bundles = owner.list_bundles()
        owner.fetch_bundle(bundles[0]["bundle_id"], Path("bundle"))
        owner.submit_adapter(Path("adapter"))

Downloads and uploads resume from the committed offset after an interruption, retrying with
exponential backoff; a downloaded bundle is checked (hashes, the owner's signature, issued to
us) before it is renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from offsite.artefacts.adapter import ADAPTER_MANIFEST, open_adapter
from offsite.artefacts.bundle import Bundle, open_bundle
from offsite.artefacts.manifest import is_safe_name
from offsite.atomic import sha256_file
from offsite.errors import OffsiteError, VerificationError
from offsite.exchange.credentials import Credentials
from offsite.exchange.protocol import ADAPTER_FILES, CHUNK_BYTES, MAX_CHUNK_BYTES, PROTOCOL_VERSION
from offsite.transport import CHANNEL_OPTIONS, INSECURE_IDENTITY_HEADER
from offsite.transport.convert import bundle_from_proto, commit_from_proto, upload_status_from_proto
from offsite.transport.v1 import offsite_pb2 as pb
from offsite.transport.v1 import offsite_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}  # fmt: skip


class TransportError(OffsiteError):
    """The server refused a request, or could not be reached after retrying."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: `attempts` tries, waits from `initial_s` up to `max_s`."""

    attempts: int = 12
    initial_s: float = 0.25
    max_s: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise OffsiteError(f"`attempts` must be at least 1 (got {self.attempts})")

    def delays(self) -> Iterator[float]:
        delay = self.initial_s
        for _ in range(self.attempts - 1):
            yield delay * (0.5 + random.random() / 2)
            delay = min(delay * 2, self.max_s)


def _hash_prefix(path: Path, size: int):
    """A sha256 object fed with the first `size` bytes of `path` (nothing if it does not exist)."""
    digest = hashlib.sha256()
    if size:
        with open(path, "rb") as f:
            while size and (data := f.read(min(size, 1 << 20))):
                digest.update(data)
                size -= len(data)
    return digest


_END = object()


def _prefetched(call, depth: int = 8) -> Iterator:
    """Iterate a server stream while a thread keeps up to `depth` messages (~`depth` MiB) in hand.

    The synchronous API only asks for the next message when the caller wants it, so receiving
    would otherwise wait for every disk write; this overlaps the two, with bounded memory.
    """
    box: queue.Queue = queue.Queue(maxsize=depth)

    def pump() -> None:
        try:
            for message in call:
                box.put(message)
            box.put(_END)
        except grpc.RpcError as e:
            box.put(e)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        while (item := box.get()) is not _END:
            if isinstance(item, grpc.RpcError):
                raise item
            yield item
    finally:
        call.cancel()  # stops the pump if we leave early (bad chunk, error)
        while thread.is_alive():  # drain so a blocked put() can see the cancellation
            with contextlib.suppress(queue.Empty):
                box.get(timeout=0.1)
        thread.join()


def _describe(e: grpc.RpcError) -> str:
    return f"{e.code().name}: {e.details()}"


class OwnerClient:
    """Calls to one model owner's server, with retries; every method takes and returns plain data."""

    def __init__(self, channel: grpc.Channel, credentials: Credentials | None, metadata, retry: RetryPolicy,
                 chunk_bytes: int) -> None:  # fmt: skip
        self.stub = pb_grpc.OffsiteStub(channel)
        self.credentials = credentials
        self.metadata = metadata
        self.retry = retry
        self.chunk_bytes = chunk_bytes

    def _call(self, fn: Callable, what: str):
        """Run `fn()` with retries on transient failures."""
        delays = self.retry.delays()
        while True:
            try:
                return fn()
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE:
                    raise TransportError(f"{what}: {_describe(e)}", e.code()) from None
                delay = next(delays, None)
                if delay is None:
                    raise TransportError(
                        f"{what}: gave up after {self.retry.attempts} attempts ({_describe(e)})",
                        e.code(),
                    ) from None
                log.info("%s: %s; retrying in %.1f s", what, _describe(e), delay)
                time.sleep(delay)

    def health(self) -> dict:
        r = self._call(
            lambda: self.stub.Health(pb.HealthRequest(), metadata=self.metadata, timeout=30),
            "health",
        )
        return {"status": r.status, "identity": r.identity, "format_version": r.format_version}

    def list_bundles(self) -> list[dict]:
        req = pb.ListBundlesRequest(format_version=PROTOCOL_VERSION)
        r = self._call(
            lambda: self.stub.ListBundles(req, metadata=self.metadata, timeout=60), "list bundles"
        )
        return [bundle_from_proto(b) for b in r.bundles]

    # download
    def fetch_bundle(
        self, bundle_id: str, out: Path, on_bytes: Callable[[int], None] | None = None
    ) -> Bundle:
        """Download a bundle into `out` (resuming a previous partial download), verify it, then rename
        it into place; returns it (its files were hashed as they arrived, not read again)."""
        if out.exists():
            raise OffsiteError(f"{out}: already exists; choose another `out`")
        info = next((b for b in self.list_bundles() if b["bundle_id"] == bundle_id), None)
        if info is None:
            raise TransportError(
                f"no bundle {bundle_id} is issued to you", grpc.StatusCode.NOT_FOUND
            )
        staging = out.with_name(out.name + ".partial")
        staging.mkdir(parents=True, exist_ok=True)
        hashed = {}
        for f in info["files"]:
            if not is_safe_name(f["name"]):
                raise VerificationError(
                    f"server listed an unsafe file name {f['name']!r}; refusing the bundle"
                )
            hashed[f["name"]] = self._fetch_file(bundle_id, f, staging, on_bytes)
        try:
            bundle = self._check_bundle(staging, hashed)
        except OffsiteError:
            shutil.rmtree(staging, ignore_errors=True)  # tampered content must not be resumed
            raise
        os.replace(staging, out)
        return Bundle(out, bundle.manifest)

    def _check_bundle(self, path: Path, hashed: dict[str, str]) -> Bundle:
        bundle = open_bundle(path, hashed)
        if self.credentials is not None:
            self.credentials.check_bundle(bundle)
        return bundle

    def _fetch_file(self, bundle_id: str, f: dict, staging: Path, on_bytes) -> str:
        """Download one file (resuming its .part), hashing as it arrives; returns its sha256."""
        final, part = staging / f["name"], staging / (f["name"] + ".part")
        if final.is_file() and sha256_file(final) == f["sha256"]:
            return f["sha256"]
        final.parent.mkdir(parents=True, exist_ok=True)
        if part.exists() and part.stat().st_size > f["size"]:
            part.unlink()
        digest = hashlib.sha256()

        def stream() -> None:
            nonlocal digest
            offset = part.stat().st_size if part.exists() else 0
            digest = _hash_prefix(part, offset)  # what is already on disk, after a restart or retry
            if offset == f["size"]:
                return
            req = pb.DownloadRequest(
                format_version=PROTOCOL_VERSION, bundle_id=bundle_id, file=f["name"], offset=offset
            )
            with open(part, "ab") as out:
                for chunk in _prefetched(self.stub.Download(req, metadata=self.metadata)):
                    if (
                        chunk.offset != out.tell()
                        or len(chunk.data) > MAX_CHUNK_BYTES
                        or out.tell() + len(chunk.data) > f["size"]
                    ):
                        raise VerificationError(
                            f"{f['name']}: server sent a chunk out of place; refusing it"
                        )
                    out.write(chunk.data)
                    digest.update(chunk.data)
                    if on_bytes:
                        on_bytes(len(chunk.data))

        self._call(stream, f"download {f['name']}")
        if part.stat().st_size != f["size"] or digest.hexdigest() != f["sha256"]:
            part.unlink()
            raise VerificationError(
                f"{f['name']}: downloaded bytes do not match the listed sha256; run the command again"
            )
        os.replace(part, final)
        return digest.hexdigest()

    # upload
    def submit_adapter(
        self, adapter_dir: Path, on_bytes: Callable[[int], None] | None = None
    ) -> dict:
        """Upload a signed adapter (resuming a previous partial upload) and ask the owner to verify it."""
        adapter = open_adapter(adapter_dir)
        names = ADAPTER_FILES[adapter.kind]
        if not (adapter_dir / names[-1]).is_file():
            raise OffsiteError(
                f"{adapter_dir}: adapter is not signed; fine-tune with `credentials` or sign it"
            )
        files = [
            {
                "name": n,
                "size": (adapter_dir / n).stat().st_size,
                "sha256": sha256_file(adapter_dir / n),
            }
            for n in names
        ]
        req = pb.BeginUploadRequest(format_version=PROTOCOL_VERSION, bundle_id=adapter.manifest["bundle_id"],
                                    files=[pb.FileInfo(**f) for f in files])  # fmt: skip
        status = upload_status_from_proto(
            self._call(lambda: self.stub.BeginUpload(req, metadata=self.metadata), "begin upload")
        )
        upload_id = status["upload_id"]
        for f in files:
            self._call(
                lambda f=f: self._send_file(upload_id, adapter_dir, f, on_bytes),
                f"upload {f['name']}",
            )
        creq = pb.CommitUploadRequest(format_version=PROTOCOL_VERSION, upload_id=upload_id)
        result = commit_from_proto(
            self._call(
                lambda: self.stub.CommitUpload(creq, metadata=self.metadata), "commit upload"
            )
        )
        if result["status"] != "verified":
            raise VerificationError(f"the model owner rejected the adapter: {result['reason']}")
        return {**result, "upload_id": upload_id, "manifest": (adapter_dir / ADAPTER_MANIFEST).name}

    def _committed(self, upload_id: str, name: str) -> int:
        req = pb.QueryUploadRequest(format_version=PROTOCOL_VERSION, upload_id=upload_id)
        status = upload_status_from_proto(self.stub.QueryUpload(req, metadata=self.metadata))
        return next(f["committed"] for f in status["files"] if f["name"] == name)

    def _send_file(self, upload_id: str, root: Path, f: dict, on_bytes) -> None:
        offset = self._committed(upload_id, f["name"])
        if offset >= f["size"]:
            return

        def requests() -> Iterator[pb.WriteRequest]:
            with open(root / f["name"], "rb") as src:
                src.seek(offset)
                pos = offset
                while data := src.read(self.chunk_bytes):
                    yield pb.WriteRequest(
                        format_version=PROTOCOL_VERSION,
                        upload_id=upload_id,
                        file=f["name"],
                        offset=pos,
                        data=data,
                    )
                    pos += len(data)
                    if on_bytes:
                        on_bytes(len(data))

        self.stub.Write(requests(), metadata=self.metadata)


@contextlib.contextmanager
def connect(
    address: str,
    credentials: Credentials | None,
    *,
    insecure_identity: str | None = None,
    retry: RetryPolicy | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[OwnerClient]:
    """A client over mutual TLS (or, with `insecure_identity`, plaintext for local testing only)."""
    if insecure_identity is not None:
        log.warning("INSECURE MODE: no TLS; for local testing only")
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        metadata = ((INSECURE_IDENTITY_HEADER, insecure_identity),)
    else:
        if credentials is None:
            raise OffsiteError("`credentials` is required to talk to a model owner")
        tls = grpc.ssl_channel_credentials(root_certificates=credentials.ca_cert.encode(),
                                           private_key=credentials.client_key.encode(),
                                           certificate_chain=credentials.client_cert.encode())  # fmt: skip
        channel = grpc.secure_channel(address, tls, options=CHANNEL_OPTIONS)
        metadata = ()
    try:
        yield OwnerClient(channel, credentials, metadata, retry or RetryPolicy(), chunk_bytes)
    finally:
        channel.close()


def pick_bundle(bundles: list[dict], bundle_id: str | None) -> dict:
    """The listed bundle with `bundle_id` (with or without its sha256: prefix), else the newest."""
    if bundle_id:
        match = [b for b in bundles if b["bundle_id"] in (bundle_id, f"sha256:{bundle_id}")]
        if not match:
            raise OffsiteError(
                f"`bundle_id` {bundle_id}: not among the {len(bundles)} bundles issued to you"
            )
        return match[0]
    if not bundles:
        raise OffsiteError("the model owner has issued no bundle to you yet")
    return bundles[-1]


def fetch(
    owner: OwnerClient,
    bundle_id: str | None,
    out: Path,
    on_bytes: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> Bundle:
    """`data-owner fetch`: download a bundle issued to us (resumable), verified before it is in
    place; `on_total` hears its size in bytes before the download starts."""
    info = pick_bundle(owner.list_bundles(), bundle_id)
    if on_total:
        on_total(sum(f["size"] for f in info["files"]))
    return owner.fetch_bundle(info["bundle_id"], out, on_bytes=on_bytes)


def submit(
    owner: OwnerClient, adapter: Path, on_bytes: Callable[[int], None] | None = None
) -> dict:
    """`data-owner submit`: upload a signed adapter (resumable); the owner verifies it on arrival."""
    return owner.submit_adapter(adapter, on_bytes=on_bytes)
