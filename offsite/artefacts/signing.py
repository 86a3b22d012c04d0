"""Ed25519 signatures over manifests: the owner signs bundles, data owners sign adapters."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from offsite.atomic import write_bytes_atomic, write_json_atomic
from offsite.errors import OffsiteError, VerificationError

SIGNATURE_FORMAT = "offsite-tuning/signature"
SIGNATURE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Signer:
    """Who signs, with which key."""

    name: str
    key: Ed25519PrivateKey

    def sign(self, manifest: Path, signature: Path) -> None:
        sign_file(manifest, signature, self.key, self.name)


def new_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_id(key: Ed25519PublicKey) -> str:
    """Short, stable name of a public key: the first 16 hex digits of sha256 of its raw bytes."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private(pem: bytes, where: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise OffsiteError(f"{where}: not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise OffsiteError(f"{where}: signing key must be Ed25519")
    return key


def load_public(pem: bytes, where: str) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError):
        raise OffsiteError(f"{where}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise OffsiteError(f"{where}: signing key must be Ed25519")
    return key


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Save a private key readable by its owner only."""
    write_bytes_atomic(path, private_pem(key), private=True)


def sign_file(manifest: Path, signature: Path, key: Ed25519PrivateKey, signer: str) -> None:
    """Write a detached signature of `manifest`'s exact bytes."""
    sig = key.sign(manifest.read_bytes())
    write_json_atomic(signature, {
        "format": SIGNATURE_FORMAT, "format_version": SIGNATURE_FORMAT_VERSION, "algorithm": "ed25519",
        "signer": signer, "key_id": key_id(key.public_key()), "signature": base64.b64encode(sig).decode(),
    })  # fmt: skip


def verify_file(manifest: Path, signature: Path, key: Ed25519PublicKey) -> str:
    """Check `signature` over `manifest` with `key`; returns the signer name it claims."""
    if not signature.is_file():
        raise VerificationError(f"{signature}: missing; the artefact is not signed")
    try:
        data = json.loads(signature.read_text())
        sig = base64.b64decode(data["signature"], validate=True)
        ok_format = data["format"] == SIGNATURE_FORMAT and data["algorithm"] == "ed25519"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise VerificationError(f"{signature}: malformed signature file") from None
    if not ok_format or data.get("format_version") != SIGNATURE_FORMAT_VERSION:
        raise VerificationError(f"{signature}: unsupported signature format")
    if data.get("key_id") != key_id(key):
        raise VerificationError(
            f"{signature}: signed by key {data.get('key_id')!r}, not the expected {key_id(key)}"
        )
    try:
        key.verify(sig, manifest.read_bytes())
    except InvalidSignature:
        raise VerificationError(
            f"{signature}: signature does not match {manifest.name} (tampered or wrong key)"
        ) from None
    return str(data.get("signer", ""))


def load_public_file(path: str | Path) -> Ed25519PublicKey:
    """A PEM Ed25519 public key file, or a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise OffsiteError(f"{path}: public key file not found")
    return load_public(path.read_bytes(), str(path))
