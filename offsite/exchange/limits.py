"""What one owner server grants each data owner: calls at once, open uploads and their bytes, stored adapters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from offsite.errors import OffsiteError
from offsite.exchange.protocol import Busy
from offsite.exchange.registry import Registry


@dataclass(frozen=True)
class ServiceLimits:
    """What one server grants: calls at once (all callers, and per data owner), idle streams, staging."""

    max_calls: int = 32  # concurrent RPCs in all (= worker threads); more are refused, not queued
    max_calls_per_identity: int = 8  # so one data owner can never hold every worker
    idle_stream_s: float = 60.0  # a Write stream that sends nothing this long is cancelled
    max_open_uploads: int = 4  # per data owner
    max_staged_bytes: int = 4 << 30  # per data owner: announced bytes of its open uploads
    upload_ttl_s: float = 24 * 3600.0  # open uploads untouched this long are removed
    max_stored_adapters: int = 64  # per data owner: verified adapters kept in the home
    max_stored_bytes: int = 16 << 30  # per data owner: bytes of those adapters
    recheck_s: float = 1.0  # a running stream re-checks its caller's revocation this often

    def __post_init__(self) -> None:
        if not 1 <= self.max_calls_per_identity <= self.max_calls:
            raise OffsiteError("max_calls_per_identity must be between 1 and max_calls")
        if (
            min(self.idle_stream_s, self.upload_ttl_s, self.recheck_s) <= 0
            or min(
                self.max_open_uploads,
                self.max_staged_bytes,
                self.max_stored_adapters,
                self.max_stored_bytes,
            )
            < 1
        ):
            raise OffsiteError("service limits must be positive")


def check_upload_quota(registry: Registry, limits: ServiceLimits, identity: str, size: int) -> None:
    """Refuse (Busy) an upload of `size` bytes that would pass `identity`'s open-upload limits."""
    mine = [u for u in registry.uploads_in_state("open") if u["data_owner"] == identity]
    if len(mine) >= limits.max_open_uploads:
        raise Busy(
            f"{identity} has {len(mine)} open uploads (limit {limits.max_open_uploads}); "
            "finish one or wait until stale ones expire"
        )
    staged = sum(f["size"] for u in mine for f in u["files"])
    if staged + size > limits.max_staged_bytes:
        raise Busy(
            f"{identity} would stage {staged + size} bytes (limit {limits.max_staged_bytes})"
        )


def check_stored(registry: Registry, limits: ServiceLimits, identity: str, size: int) -> None:
    """Refuse (Busy) keeping `size` more bytes of adapters past `identity`'s storage limits."""
    mine = [
        a for a in registry.adapters() if a["data_owner"] == identity and a["status"] == "verified"
    ]
    if len(mine) >= limits.max_stored_adapters:
        raise Busy(f"{identity} has {len(mine)} adapters stored with the owner (limit "
                   f"{limits.max_stored_adapters}); ask the owner to remove some")  # fmt: skip
    stored = sum(_folder_bytes(Path(a["path"])) for a in mine)
    if stored + size > limits.max_stored_bytes:
        raise Busy(f"{identity} would store {stored + size} bytes of adapters (limit "
                   f"{limits.max_stored_bytes}); ask the owner to remove some")  # fmt: skip


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else 0
