"""A data owner's credentials file: TLS client cert + key, the owner's CA, and signing keys."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from offsite.artefacts.bundle import Bundle
from offsite.artefacts.signing import load_public
from offsite.atomic import write_json_atomic
from offsite.errors import OffsiteError, VerificationError

CREDENTIALS_FORMAT = "offsite-tuning/credentials"
CREDENTIALS_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Credentials:
    """Everything a data owner needs to talk to one model owner (PEM strings)."""

    name: str
    ca_cert: str
    client_cert: str
    client_key: str
    signing_key: str  # the data owner's Ed25519 private key (signs adapters)
    owner_public_key: str  # the model owner's Ed25519 public key (verifies bundles)

    def check_bundle(self, bundle: Bundle) -> None:
        """The bundle is signed by the model owner these credentials name, and issued to us."""
        bundle.verify_signature(load_public(self.owner_public_key.encode(), "credentials"))
        issued = bundle.manifest.get("issued_to")
        if issued != self.name:
            raise VerificationError(
                f"{bundle.path}: bundle is issued to {issued!r}, not to {self.name!r}"
            )

    def save(self, path: Path) -> None:
        """Write the file readable by its owner only (it holds private keys)."""
        write_json_atomic(
            path,
            {
                "format": CREDENTIALS_FORMAT,
                "format_version": CREDENTIALS_FORMAT_VERSION,
                **asdict(self),
            },
            private=True,
        )


def load_credentials(path: str | Path) -> Credentials:
    """Read a credentials file, or a one-line error naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise OffsiteError(
            f"{path}: credentials file not found; ask the model owner for one (owner enroll)"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise OffsiteError(f"{path}: not a credentials file (invalid JSON)") from None
    if not isinstance(data, dict) or data.get("format") != CREDENTIALS_FORMAT:
        raise OffsiteError(f"{path}: not an offsite-tuning credentials file")
    if data.get("format_version") != CREDENTIALS_FORMAT_VERSION:
        raise OffsiteError(
            f"{path}: credentials format_version {data.get('format_version')!r} is not supported"
        )
    fields = Credentials.__dataclass_fields__
    missing = [k for k in fields if not isinstance(data.get(k), str) or not data[k]]
    if missing:
        raise OffsiteError(f"{path}: missing {', '.join(missing)}")
    return Credentials(**{k: data[k] for k in fields})
