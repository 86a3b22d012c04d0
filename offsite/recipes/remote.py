"""How a data owner reaches the model owner: the address and its retry policy."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from offsite.exchange.credentials import Credentials


@dataclass(frozen=True)
class Remote:
    """The model owner's server: `address` (host:port) and how many attempts each call gets."""

    address: str
    retries: int = 12
    insecure_identity: str | None = None  # plaintext, for local tests only


@contextlib.contextmanager
def connected(remote: Remote, creds: Credentials | None) -> Iterator:
    """A client for `remote` over mutual TLS (grpc is imported only when a server is used)."""
    from offsite.transport.client import RetryPolicy, connect

    with connect(remote.address, creds, insecure_identity=remote.insecure_identity,
                 retry=RetryPolicy(attempts=remote.retries)) as owner:  # fmt: skip
        yield owner
