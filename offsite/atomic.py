"""Atomic writes: everything is written beside its target under a temporary name, then renamed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

from offsite.errors import OffsiteError

_HASH_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, private: bool = False) -> None:
    """Write bytes to `path` so that readers see either the old file or the whole new one.

    `private`: the file is readable by its owner only from the first byte on (mkstemp's 0600 is
    kept), for private keys and credentials.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    if not private:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, private: bool = False) -> None:
    """Write `obj` as indented, key-sorted JSON atomically (owner-only with `private`)."""
    write_bytes_atomic(
        path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), private=private
    )


def check_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse to clobber an existing non-empty output directory unless asked to."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OffsiteError(f"{out}: exists and is not a directory; choose another `out`")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OffsiteError(
            f"{out}: directory exists and is not empty; choose another `out` or pass `overwrite`"
        )
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Remove the temporary folders that writers of `out` killed mid-write left behind (those whose
    process is gone); a live writer's is kept."""
    removed = []
    for tmp in out.parent.glob(f".{glob_escape(out.name)}.*.partial"):
        pid = tmp.name[len(out.name) + 2 :].split(".", 1)[0]
        if tmp.is_dir() and not tmp.is_symlink() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it replaces `out` in one rename.

    On any error the temporary directory is removed and `out` is left as it was.
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".partial", dir=out.parent)
    )
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should look like a normal dir
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_apart(
    outputs: dict[str, str | os.PathLike | None],  # by name: a field as `out`, or a flag
    input_dirs: dict[str, str | os.PathLike | None] | None = None,
    input_files: dict[str, str | os.PathLike | None] | None = None,
) -> None:
    """Refuse an output that is, contains or lies inside an input folder, or that contains an input
    file: writing it (or replacing it with --overwrite) would destroy the input."""
    resolve = lambda d: {k: Path(v).resolve() for k, v in (d or {}).items() if v is not None}  # noqa: E731
    outs, dirs, files = resolve(outputs), resolve(input_dirs), resolve(input_files)
    for oname, out in outs.items():
        for iname, folder in dirs.items():
            if _inside(out, folder) or _inside(folder, out):
                raise OffsiteError(
                    f"{oname} {out} overlaps {iname} {folder}; write the output outside the inputs"
                )
        for iname, file in files.items():
            if _inside(file, out):
                raise OffsiteError(
                    f"{oname} {out} contains {iname} {file}; write the output outside the inputs"
                )


def _existing_parent(out: str | os.PathLike) -> Path:
    """The nearest folder above `out` that exists (where it would be created)."""
    parent = Path(out).resolve().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def check_free_space(out: str | os.PathLike, needed: int, what: str) -> None:
    """Fail now when the file system `out` is to go on has less than `needed` bytes free."""
    parent = _existing_parent(out)
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise OffsiteError(f"{out}: {what} needs about {needed / 2**20:.0f} MiB but {parent} has "
                           f"{free / 2**20:.0f} MiB free; free some space or choose another place")  # fmt: skip


def check_writable(out: str | os.PathLike) -> None:
    """Fail now, not after hours of work, when `out` cannot be created where it is to go."""
    parent = _existing_parent(out)
    if not parent.is_dir():
        raise OffsiteError(f"{out}: {parent} is not a directory; choose another `out`")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OffsiteError(
            f"{out}: cannot write into {parent} (permission denied); choose another `out`"
        )
