"""The owner's home: `owner init`, `enroll`, `revoke`, `adapters` and `cleanup`."""

from __future__ import annotations

from pathlib import Path

from offsite.exchange.home import enroll, init_home, open_home

ADAPTER_FIELDS = ("adapter_id", "data_owner", "bundle_id", "status", "reason", "received_at")


def create_home(home: Path, server_names: list[str]) -> dict:
    """A new home: CA, server certificate, signing key, registry (built aside, then renamed)."""
    created = init_home(home, server_names)
    return {"home": str(created.root), "ca": str(created.root / "ca.pem"),
            "signing_public_key": str(created.root / "signing.pub")}  # fmt: skip


def enroll_data_owner(home: Path, name: str, out: Path) -> dict:
    """`name`'s credentials (client certificate, signing key, the CA) written to `out`."""
    enroll(open_home(home), name, out)
    return {
        "data_owner": name,
        "credentials": str(out),
        "deliver": "out of band; the file holds private keys",
    }


def revoke_data_owner(home: Path, name: str) -> dict:
    with open_home(home).registry() as registry:
        registry.revoke(name)
    return {"revoked": name}


def list_adapters(home: Path) -> list[dict]:
    """Every adapter received, with its verdict."""
    with open_home(home).registry() as registry:
        return [{k: r[k] for k in ADAPTER_FIELDS} for r in registry.adapters()]


def clean_home(home: Path) -> dict:
    """Expire stale uploads and remove leftover staging folders; what was removed."""
    from offsite.exchange.service import OwnerService

    service = OwnerService(open_home(home))  # opening it expires and sweeps
    try:
        return service.at_start
    finally:
        service.close()
