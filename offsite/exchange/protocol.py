"""What both ends of the exchange agree on: protocol version, chunk sizes, file names, error kinds.

The data owner's client imports only this module from the owner's side of the exchange.
"""

from __future__ import annotations

from offsite.artefacts.adapter import ADAPTER_MANIFEST, ADAPTER_SIGNATURE, PAYLOADS
from offsite.errors import OffsiteError

PROTOCOL_VERSION = 1
CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 1 << 20
# the files an adapter upload holds, by adapter kind (whole blocks, or a PEFT delta)
ADAPTER_FILES = {
    kind: (*payload, ADAPTER_MANIFEST, ADAPTER_SIGNATURE) for kind, payload in PAYLOADS.items()
}


class Unauthenticated(OffsiteError):
    """The caller's certificate is unknown, revoked or replaced."""


class AccessDenied(OffsiteError):
    """The caller may not touch this bundle or upload."""


class NotFound(OffsiteError):
    """No such bundle, file or upload (for this caller)."""


class BadRequest(OffsiteError):
    """A malformed request: unsafe name, oversized chunk, wrong offset, wrong protocol version."""


class Busy(OffsiteError):
    """The server is at a limit for this caller (concurrent calls, open uploads, staged bytes)."""
