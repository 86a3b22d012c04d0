"""The model owner's home directory: CA, server certificate, signing key, registry, received files.

home/ca.pem ca.key server.pem server.key signing.key signing.pub registry.sqlite
     uploads/<upload id>/...    adapters/<adapter id>/...
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from offsite.artefacts.adapter import open_adapter
from offsite.artefacts.bundle import MANIFEST_NAME, SIGNATURE_NAME, Bundle, open_bundle
from offsite.artefacts.signing import (
    Signer,
    load_private,
    load_public,
    new_signing_key,
    private_pem,
    public_pem,
    write_private_key,
)
from offsite.atomic import atomic_directory, check_writable, sha256_file, write_bytes_atomic
from offsite.emulator.package import PackageSpec, package
from offsite.errors import OffsiteError
from offsite.exchange.credentials import Credentials
from offsite.exchange.pki import KeyPair, cert_fingerprint, issue_client, issue_server, make_ca
from offsite.exchange.registry import Registry

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclass(frozen=True)
class OwnerHome:
    """Paths inside an owner home, and access to what is in it."""

    root: Path

    @property
    def ca(self) -> KeyPair:
        return KeyPair((self.root / "ca.key").read_bytes(), (self.root / "ca.pem").read_bytes())

    @property
    def server(self) -> KeyPair:
        return KeyPair(
            (self.root / "server.key").read_bytes(), (self.root / "server.pem").read_bytes()
        )

    @property
    def signing_key(self):
        return load_private(
            (self.root / "signing.key").read_bytes(), str(self.root / "signing.key")
        )

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    def registry(self) -> Registry:
        return Registry(self.root / "registry.sqlite")


def init_home(root: str | Path, server_names: list[str]) -> OwnerHome:
    """Create a CA, a server certificate, an Ed25519 signing key and an empty registry."""
    root = Path(root).resolve()  # the registry stores absolute paths: valid from any directory
    if (root / "registry.sqlite").exists() or (root / "ca.pem").exists():
        raise OffsiteError(f"{root}: already an owner home; use another `home`")
    if root.is_dir() and any(root.iterdir()) or root.exists() and not root.is_dir():
        raise OffsiteError(
            f"{root}: exists and is not an empty folder; a new home needs a new or empty `home`"
        )
    try:
        with atomic_directory(
            root
        ) as tmp:  # all of it or nothing: no half-made home is left behind
            _write_home(tmp, server_names)
    except OSError as e:
        raise OffsiteError(
            f"`home` {root}: cannot create it ({e.strerror}); choose another place"
        ) from None
    return OwnerHome(root)


def _write_home(root: Path, server_names: list[str]) -> None:
    ca = make_ca()
    server = issue_server(ca, server_names)
    key = new_signing_key()
    write_bytes_atomic(root / "ca.key", ca.key_pem, private=True)
    write_bytes_atomic(root / "ca.pem", ca.cert_pem)
    write_bytes_atomic(root / "server.key", server.key_pem, private=True)
    write_bytes_atomic(root / "server.pem", server.cert_pem)
    write_private_key(root / "signing.key", key)
    write_bytes_atomic(root / "signing.pub", public_pem(key.public_key()))
    home = OwnerHome(root)
    for d in (home.uploads, home.adapters):
        d.mkdir(exist_ok=True)
    home.registry().close()


def open_home(root: str | Path) -> OwnerHome:
    """An existing owner home, or a clear error."""
    root = Path(root).resolve()
    for name in ("ca.pem", "ca.key", "server.pem", "server.key", "signing.key", "registry.sqlite"):
        if not (root / name).is_file():
            raise OffsiteError(
                f"{root}: not an owner home ({name} missing); create one with owner init"
            )
    return OwnerHome(root)


def check_name(name: str) -> str:
    if not name or not set(name) <= _NAME_CHARS or name.startswith("."):
        raise OffsiteError(f"`name` {name!r}: use letters, digits, '-', '_' and '.' only")
    return name


def enroll(home: OwnerHome, name: str, out: Path | None = None) -> Credentials:
    """Issue a client certificate and a signing key for a new data owner and record them.

    `out`: write the credentials there first, and record the data owner only once they are
    written (a name is never enrolled without its credentials, nor burned by a failed write).
    """
    check_name(name)
    with home.registry() as registry:
        if registry.data_owner(name) is not None:
            raise OffsiteError(
                f"data owner {name!r} is already enrolled; pick another `name` or revoke it first"
            )
    if out is not None:
        _check_new_file(Path(out))
    client = issue_client(home.ca, name)
    signing = new_signing_key()
    owner_pub = public_pem(home.signing_key.public_key()).decode()
    creds = Credentials(name=name, ca_cert=home.ca.cert_pem.decode(), client_cert=client.cert_pem.decode(),
                        client_key=client.key_pem.decode(), signing_key=private_pem(signing).decode(),
                        owner_public_key=owner_pub)  # fmt: skip
    if out is not None:
        creds.save(Path(out))
    try:
        with home.registry() as registry:
            registry.add_data_owner(
                name, cert_fingerprint(client.cert_pem), public_pem(signing.public_key()).decode()
            )
    except BaseException:
        if out is not None:
            Path(out).unlink(missing_ok=True)
        raise
    return creds


def _check_new_file(out: Path) -> None:
    if out.exists():
        raise OffsiteError(f"{out}: already exists; choose another `out`")
    if not out.parent.is_dir():
        raise OffsiteError(
            f"{out}: no such directory {out.parent}; create it or choose another `out`"
        )
    check_writable(out)


def listing(bundle: Bundle) -> list[dict]:
    """Name, size and sha256 of every file a data owner downloads for a (verified) bundle.

    The manifest's own digests were checked when `bundle` was opened, so only the manifest and
    its signature are hashed here.
    """
    digests = {**bundle.manifest["files"]}
    for name in (MANIFEST_NAME, SIGNATURE_NAME):
        digests[name] = sha256_file(bundle.path / name)
    return [
        {
            "name": n,
            "size": (bundle.path / n).stat().st_size,
            "sha256": digest,
        }
        for n, digest in digests.items()
    ]


def active_data_owner(home: OwnerHome, name: str) -> None:
    """Refuse a name that is not an enrolled, unrevoked data owner."""
    with home.registry() as registry:
        owner = registry.data_owner(name)
    if owner is None or owner.revoked_at:
        raise OffsiteError(
            f"`issued_to` {name!r}: no active data owner by that name; enroll it first"
        )


def register_bundle(home: OwnerHome, bundle: Bundle, data_owner: str, model: str) -> None:
    """Record a signed bundle as issued to `data_owner`, so the server offers it to them alone."""
    with home.registry() as registry:
        registry.add_bundle(bundle.bundle_id, data_owner, bundle.path.name, str(bundle.path.resolve()),
                            model, listing(bundle))  # fmt: skip


def issue_bundle(
    home: OwnerHome, data_owner: str, spec: PackageSpec, *, on_step: Callable | None = None
) -> Bundle:
    """`owner package-emulator --home --for`: package a bundle signed by the owner, issued to one
    active data owner, and register it."""
    active_data_owner(home, data_owner)
    signer = Signer("model-owner", home.signing_key)
    bundle = package(spec, signer=signer, extra={"issued_to": data_owner}, on_step=on_step)
    register_bundle(home, bundle, data_owner, spec.model)
    return bundle


@dataclass(frozen=True)
class MergeInputs:
    """What the registry vouches for, for one merge: the files, the signer's key and its standing."""

    adapter: Path
    bundle: Path
    key: object
    model: str
    signer: str
    signer_revoked_at: str | None


def merge_inputs(
    home: OwnerHome, adapter: str, bundle: str | None = None, allow_revoked: bool = False
) -> MergeInputs:
    """(adapter dir, bundle dir, the signer's public key, model) for `owner merge-adapter --home`.

    `adapter` is an adapter id from the registry (a verified upload) or an adapter directory;
    either way the signer must be an enrolled data owner, whose registered key is returned, and
    the bundle must be one the owner issued to that data owner. A revoked signer's adapter is
    refused unless `allow_revoked` (and the merge record says so).
    """
    with home.registry() as registry:
        record = registry.adapter(adapter)
        if record is not None:
            if record["status"] != "verified":
                raise OffsiteError(
                    f"adapter {record['adapter_id']} was rejected: {record['reason']}"
                )
            path, signer, bundle_id = (
                Path(record["path"]),
                record["data_owner"],
                record["bundle_id"],
            )
        elif Path(adapter).is_dir():
            manifest = open_adapter(adapter).manifest
            path, signer, bundle_id = Path(adapter), manifest.get("signer"), manifest["bundle_id"]
            if not isinstance(signer, str):
                raise OffsiteError(
                    f"{adapter}: the adapter is unsigned; the registry vouches only for signed adapters"
                )
        else:
            raise OffsiteError(
                f"`adapter` {adapter!r}: no such adapter id in {home.root} (see `owner adapters`) and no such directory"
            )
        owner = registry.data_owner(signer)
        if owner is None:
            raise OffsiteError(f"{path}: signed by {signer!r}, who is not enrolled in {home.root}")
        issued = registry.bundle(bundle_id)
    if issued is None or issued["data_owner"] != signer:
        raise OffsiteError(
            f"{path}: bundle {bundle_id[:19]}… was not issued to {signer!r} by this home"
        )
    if bundle is not None and open_bundle(bundle).bundle_id != bundle_id:
        raise OffsiteError(f"`bundle` {bundle}: not the bundle the adapter was trained from")
    if owner.revoked_at and not allow_revoked:
        raise OffsiteError(f"{path}: signed by {signer!r}, revoked at {owner.revoked_at}; merge it only "
                           "knowingly, with `allow_revoked` (the merge record says so)")  # fmt: skip
    key = load_public(owner.signing_key.encode(), f"{home.root} registry entry of {signer}")
    return MergeInputs(
        path, Path(bundle or issued["path"]), key, issued["model"], signer, owner.revoked_at
    )
