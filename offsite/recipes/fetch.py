"""`data-owner fetch`: download a bundle issued to us (resumable), verified before it is in place."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from offsite.artefacts.bundle import Bundle
from offsite.recipes.identity import credentials_of
from offsite.recipes.remote import Remote, connected


def fetch_bundle(
    remote: Remote,
    credentials: Path | None,
    out: Path,
    bundle_id: str | None = None,
    *,
    on_bytes: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> Bundle:
    """The bundle `bundle_id` (default: the newest issued to us) in `out`; `on_total` hears its
    size in bytes before the download starts, `on_bytes` each chunk."""
    from offsite.transport.client import fetch

    with connected(remote, credentials_of(credentials)) as owner:
        return fetch(owner, bundle_id, out, on_bytes=on_bytes, on_total=on_total)
