"""Who a data owner is: its credentials file (from `owner enroll`), which verifies the owner's
bundles and signs its adapters."""

from __future__ import annotations

from pathlib import Path

from offsite.artefacts.bundle import Bundle, open_bundle
from offsite.artefacts.signing import Signer, load_private
from offsite.exchange.credentials import Credentials, load_credentials


def credentials_of(path: Path | None) -> Credentials | None:
    return load_credentials(path) if path else None


def signer_of(path: Path | None) -> Signer | None:
    """The data owner's signer, from an `owner enroll` credentials file (None without one)."""
    creds = credentials_of(path)
    return Signer(creds.name, load_private(creds.signing_key.encode(), path)) if creds else None


def verified_bundle(path: Path, credentials: Path | None) -> Bundle:
    """A bundle directory, its hashes checked; with credentials also the owner's signature and
    that it was issued to us."""
    bundle = open_bundle(path)
    creds = credentials_of(credentials)
    if creds is not None:
        creds.check_bundle(bundle)
    return bundle
