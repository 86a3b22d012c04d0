"""Who a data owner is: its credentials file (from `owner enroll`), which verifies the owner's
bundles and signs its adapters."""

from __future__ import annotations

from pathlib import Path

from offsite.artefacts.bundle import Bundle, open_bundle
from offsite.artefacts.signing import Signer, load_private
from offsite.exchange.credentials import Credentials, load_credentials


def credentials_of(path: Path | None) -> Credentials | None:
    return load_credentials(path) if path else None


def signer_of(creds: Credentials | None, source: Path | None) -> Signer | None:
    """The data owner's signer, from credentials loaded from the file `source` (None without)."""
    return Signer(creds.name, load_private(creds.signing_key.encode(), source)) if creds else None


def verified_bundle(path: Path, creds: Credentials | None) -> Bundle:
    """A bundle directory, its hashes checked; with credentials also the owner's signature and
    that it was issued to us."""
    bundle = open_bundle(path)
    if creds is not None:
        creds.check_bundle(bundle)
    return bundle
