"""`data-owner submit`: upload a signed adapter (resumable); the owner verifies it on arrival."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from offsite.recipes.identity import credentials_of
from offsite.recipes.remote import Remote, connected


def submit_adapter(
    remote: Remote,
    credentials: Path | None,
    adapter: Path,
    *,
    on_bytes: Callable[[int], None] | None = None,
) -> dict:
    """The owner's verdict on `adapter` (its id and status), after the upload completes."""
    from offsite.transport.client import submit

    with connected(remote, credentials_of(credentials)) as owner:
        return submit(owner, adapter, on_bytes=on_bytes)
