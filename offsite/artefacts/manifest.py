"""Reading and checking versioned JSON manifests and the file hashes they list."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from offsite.atomic import sha256_file
from offsite.errors import OffsiteError, VerificationError


def read_manifest(path: Path, kind: str, version: int) -> dict[str, Any]:
    """Load a manifest and check its `format` and `format_version`."""
    if not path.is_file():
        raise OffsiteError(f"{path}: missing; is {path.parent} really a {kind} directory?")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VerificationError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise VerificationError(f"{path}: JSON nested too deeply to be a manifest") from None
    if not isinstance(data, dict) or data.get("format") != kind:
        raise VerificationError(
            f"{path}: 'format' is {data.get('format') if isinstance(data, dict) else None!r}, expected {kind!r}"
        )
    if data.get("format_version") != version:
        raise VerificationError(
            f"{path}: format_version {data.get('format_version')!r} is not supported (this tool reads {version}); "
            "upgrade offsite-tuning or re-create the artefact"
        )
    return data


def field(data: dict[str, Any], key: str, typ: type | tuple[type, ...], where: Path) -> Any:
    """`data[key]`, checked to be of type `typ`, else an error naming the key."""
    if key not in data:
        raise VerificationError(f"{where}: missing key {key!r}")
    value = data[key]
    if not isinstance(value, typ) or isinstance(value, bool) and typ is int:
        raise VerificationError(f"{where}: key {key!r} has the wrong type ({type(value).__name__})")
    return value


def hash_files(
    root: Path, exclude: tuple[str, ...], known: dict[str, str] | None = None
) -> dict[str, str]:
    """sha256 of every regular file under `root` (relative posix paths), except `exclude`;
    `known`: digests the caller already took of some of these files."""
    out, known = {}, known or {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = known.get(rel) or sha256_file(p)
    return out


def _walk(root: Path) -> set[str]:
    """Relative names of the regular files under `root`; any symlink is an error (never followed)."""
    present = set()
    for folder, dirs, names in os.walk(root, followlinks=False):
        for name in dirs + names:
            path = Path(folder) / name
            if path.is_symlink():
                raise VerificationError(
                    f"{path}: is a symbolic link; artefacts hold regular files only"
                )
        for name in names:  # a FIFO or device would hang or mislead every later read
            if not stat.S_ISREG(os.lstat(Path(folder) / name).st_mode):
                raise VerificationError(
                    f"{Path(folder) / name}: not a regular file; artefacts hold regular files only"
                )
        present.update((Path(folder) / n).relative_to(root).as_posix() for n in names)
    return present


def check_files(
    root: Path,
    files: dict[str, str],
    exclude: tuple[str, ...],
    hashed: dict[str, str] | None = None,
    suffixes: tuple[str, ...] | None = None,
    unread: tuple[str, ...] = (),
) -> None:
    """Every listed file exists with its sha256, and no unlisted file (or symlink) is present.

    `hashed` holds digests the caller computed itself over these very files (e.g. while
    receiving them), so they need not be read a second time. `suffixes`: the only file types
    the artefact may list. `unread`: file types the caller will not read, so only checked to be
    present (not hashed).
    """
    hashed = hashed or {}
    present = _walk(root)
    for rel, digest in files.items():
        if not isinstance(rel, str) or not isinstance(digest, str):
            raise VerificationError(f"{root}: manifest 'files' must map names to sha256 strings")
        if not is_safe_name(rel):
            raise VerificationError(f"{root}: manifest lists an unsafe file name {rel!r}")
        if suffixes is not None and not rel.endswith(suffixes):
            raise VerificationError(
                f"{root}: manifest lists {rel!r}, a file type this artefact may not hold (only {', '.join(suffixes)})"
            )
        path = root / rel
        if rel not in present:
            raise VerificationError(f"{path}: listed in the manifest but missing")
        if unread and rel.endswith(unread):
            continue
        if (hashed.get(rel) or sha256_file(path)) != digest:
            raise VerificationError(
                f"{path}: sha256 does not match the manifest (corrupted or tampered)"
            )
    unlisted = present - set(files) - set(exclude)
    if unlisted:
        raise VerificationError(
            f"{root}: files not listed in the manifest: {', '.join(sorted(unlisted))}"
        )


def is_safe_name(name: str) -> bool:
    """A relative path with no '..', no absolute root and no backslashes."""
    parts = name.split("/")
    return (
        bool(name)
        and not name.startswith("/")
        and "\\" not in name
        and ".." not in parts
        and "" not in parts
    )
