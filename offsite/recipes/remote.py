"""How a data owner reaches the model owner: the address and its retry policy."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from offsite.recipes.identity import credentials_of


@dataclass(frozen=True)
class Remote:
    """The model owner's server: `address` (host:port) and how many attempts each call gets."""

    address: str
    retries: int = 12
    insecure_identity: str | None = None  # plaintext, for local tests only


@contextlib.contextmanager
def connected(remote: Remote, credentials: Path | None) -> Iterator:
    """A client for `remote` over mutual TLS (grpc is imported only when a server is used)."""
    from offsite.transport.client import RetryPolicy, connect

    with connect(remote.address, credentials_of(credentials), insecure_identity=remote.insecure_identity,
                 retry=RetryPolicy(attempts=remote.retries)) as owner:  # fmt: skip
        yield owner
