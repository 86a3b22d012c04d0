"""Safetensors models on disk, tensor by tensor, never the whole model in memory.

Where each tensor lives (file and byte range, from the headers), the base fingerprint computed by
streaming the bytes (equal to `model_fingerprint` of the loaded model), a copy of the model with a
few tensors replaced in place (the streaming merge: every other byte is the source's), and a
writer that assembles a safetensors file from byte ranges of other files (streaming packaging).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from offsite.artefacts.tensorcheck import ST_CODES, check_header, st_dtype
from offsite.errors import OffsiteError
from offsite.models.architectures import block_prefix, get_blocks

SINGLE = "model.safetensors"
_BUILD_LOCK = threading.Lock()
INDEX = "model.safetensors.index.json"
_CHUNK = 8 << 20
# weight files of other formats a model directory may also hold: never copied beside ours
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".safetensors")


class NotStreamable(OffsiteError):
    """The files do not name the tensors as the model does (e.g. a family whose checkpoints keep
    older names): the caller loads the model instead."""


@dataclass(frozen=True)
class Entry:
    """One tensor on disk: its file, dtype name ('bfloat16'), shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def is_sharded_dir(root: str | Path) -> bool:
    """A directory holding safetensors weights (one file or an index of shards)."""
    root = Path(root)
    return root.is_dir() and ((root / INDEX).is_file() or (root / SINGLE).is_file())


def weight_files(root: Path) -> list[Path]:
    """The weight files in the order their index names them (or the single file)."""
    if (root / INDEX).is_file():
        index = json.loads((root / INDEX).read_text())
        return [root / name for name in dict.fromkeys(index["weight_map"].values())]
    return [root / SINGLE]


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header and the offset where its data starts."""
    check_header(path)
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def tensor_map(root: Path) -> dict[str, Entry]:
    """Every tensor of the model at `root`, by name."""
    return {name: e for path in weight_files(root) for name, e in file_entries(path).items()}


def file_entries(path: Path) -> dict[str, Entry]:
    """Every tensor of one safetensors file, by name."""
    header, base = read_header(path)
    entries = {}
    for name, h in header.items():
        s, e = h["data_offsets"]
        entries[name] = Entry(path, st_dtype(h["dtype"]), tuple(h["shape"]), base + s, base + e)
    return entries


def read_bytes(entry: Entry) -> Iterator[bytes]:
    """A tensor's bytes, in chunks."""
    with open(entry.file, "rb") as f:
        f.seek(entry.start)
        left = entry.end - entry.start
        while left:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise OffsiteError(f"{entry.file}: ends before its header says it should")
            left -= len(chunk)
            yield chunk


def load_tensor(entry: Entry) -> torch.Tensor:
    """One tensor, read from its byte range straight into the memory it will use."""
    data = bytearray(entry.end - entry.start)
    with open(entry.file, "rb", buffering=0) as f:
        f.seek(entry.start)
        view = memoryview(data)
        while view:
            n = f.readinto(view)
            if not n:
                raise OffsiteError(f"{entry.file}: ends before its header says it should")
            view = view[n:]
    flat = (
        torch.frombuffer(data, dtype=getattr(torch, entry.dtype))
        if data
        else torch.empty(0, dtype=getattr(torch, entry.dtype))
    )
    return flat.reshape(entry.shape)


def state_names(root: Path) -> dict[str, str]:
    """Every state-dict name of the model at `root` -> the stored tensor that holds it (tied
    weights are stored once and named twice; a name the family's checkpoints keep from older
    versions, such as GPT-NeoX's `embed_out`, through transformers' own renaming when it loads).
    Raises if a state-dict entry is nowhere on disk."""
    model = meta_model(root)
    stored = tensor_map(root)
    loaded = _loaded_names(model, root)
    as_loaded = {loaded(name): name for name in stored}
    by_object: dict[int, list[str]] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        by_object.setdefault(id(value), []).append(name)
    out: dict[str, str] = {}
    for names in by_object.values():
        held = [as_loaded[n] for n in names if n in as_loaded]
        if not held:
            raise NotStreamable(f"{root}: {names[0]} is not stored under that name")
        out.update({n: held[0] for n in names})
    if set(stored) - set(out.values()):
        raise NotStreamable(f"{root}: stores tensors the model does not name")
    return out


def _loaded_names(model, root: Path) -> Callable[[str], str]:
    """The model's name for a stored tensor: transformers' renamings for the family (names only:
    a tensor it converts when loading, or a renamed block tensor, is not streamable, since the
    bundle copies blocks by their stored names)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # a transformers without load-time renaming: names are as stored
        return lambda stored: stored
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    others = [t for t in transforms if not isinstance(t, WeightRenaming)]
    prefix = block_prefix(model.config.model_type) + "."

    def loaded(stored: str) -> str:
        name, converted = rename_source_key(stored, renamings, others)
        in_blocks = prefix in (name[: len(prefix)], stored[: len(prefix)])
        if converted is not None or (name != stored and in_blocks):
            raise NotStreamable(f"{root}: {stored} is converted when the model loads")
        return name

    return loaded


def stream_fingerprint(root: Path, names: dict[str, str] | None = None) -> str:
    """`model_fingerprint` of the model at `root`, read tensor by tensor from disk (`names`:
    `state_names(root)`, if the caller has it; pass it when hashing in another thread)."""
    stored, names = tensor_map(root), names if names is not None else state_names(root)
    digest = hashlib.sha256()
    for name in sorted(names):
        entry = stored[names[name]]
        digest.update(f"{name}|torch.{entry.dtype}|{entry.shape}\n".encode())
        for chunk in read_bytes(entry):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def copy_with(root: Path, out: Path, replacements: Mapping[str, torch.Tensor]) -> None:
    """Copy the model at `root` into the directory `out`, overwriting the bytes of the tensors in
    `replacements` in place (same dtype and shape); every other byte is the source's. Each
    replacement is asked for once, written, and let go (a lazy mapping keeps memory to one)."""
    stored = tensor_map(root)
    for path in root.iterdir():
        if (
            path.is_file()
            and not path.name.endswith(_OTHER_WEIGHTS)
            and not path.name.startswith(".")
        ):
            shutil.copy2(path, out / path.name)
    for path in weight_files(root):
        shutil.copyfile(path, out / path.name)
    for name in replacements:
        value, e = replacements[name], stored.get(name)
        if (
            e is None
            or e.shape != tuple(value.shape)
            or e.dtype != str(value.dtype).removeprefix("torch.")
        ):
            raise OffsiteError(
                f"{root}: no stored tensor {name} of shape {list(value.shape)} and dtype {value.dtype}"
            )
        with open(out / e.file.name, "r+b") as f:
            f.seek(e.start)
            f.write(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def write_from_ranges(
    path: Path, tensors: dict[str, Entry], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file holding `tensors` (new name -> where its bytes are), byte-copied."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, e in tensors.items():
        size = e.end - e.start
        header[name] = {
            "dtype": ST_CODES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    head = len(raw).to_bytes(8, "little") + raw
    with open(path, "wb", buffering=0) as f:
        at = _write_at(f.fileno(), head, 0)
        for e in tensors.values():
            at = _copy_range(e, f.fileno(), at)


def _write_at(fd: int, data: bytes, at: int) -> int:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n
    return at


# copy_file_range fails with these where the kernel or the file systems cannot copy between the
# two files (another file system on older kernels, no support, a sandbox): copy through a buffer
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM}


def _copy_range(e: Entry, dst: int, at: int) -> int:
    """Copy a tensor's bytes into the file `dst` at offset `at`; returns the offset after them.

    In the kernel (copy_file_range: no pass through Python's memory, 4x faster here than reading
    and writing 8 MiB chunks) where the OS can; otherwise through a buffer."""
    kernel = getattr(os, "copy_file_range", None)
    with open(e.file, "rb", buffering=0) as f:
        start, left = e.start, e.end - e.start
        while left:
            n = 0
            if kernel is not None:
                try:
                    n = kernel(f.fileno(), dst, left, start, at)
                except OSError as err:
                    if err.errno not in _NO_KERNEL_COPY:
                        raise
                    kernel = None
                    continue
            else:
                n = _write_at(dst, os.pread(f.fileno(), min(_CHUNK, left), start), at) - at
            if not n:
                raise OffsiteError(f"{e.file}: ends before its header says it should")
            start, at, left = start + n, at + n, left - n
    return at


def meta_model(root: Path, dtype: torch.dtype | None = None):
    """The model at `root` with no weights (on the meta device), its blocks untied from disk."""
    config = AutoConfig.from_pretrained(root)
    # from_config switches torch's process-wide default dtype to the config's while it builds:
    # two threads building at once could leave the wrong one behind
    with _BUILD_LOCK, torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype else {}))
    model.tie_weights()
    return model


def block_parameter_names(root: Path, blocks: list[int]) -> list[str]:
    """The state-dict names of the blocks `blocks` of the model at `root`."""
    model = meta_model(root)
    prefix = block_prefix(model.config.model_type)
    return [f"{prefix}.{i}.{n}" for i in blocks for n, _ in get_blocks(model)[i].named_parameters()]


def load_blocks(root: Path, blocks: list[int]):
    """The model at `root` with only the blocks `blocks` materialised and loaded (the rest on meta),
    in the dtype they are stored in."""
    stored = tensor_map(root)
    names = block_parameter_names(root, blocks)
    model = meta_model(root, dtype=getattr(torch, stored[names[0]].dtype))
    prefix = block_prefix(model.config.model_type)
    for i in blocks:
        block = get_blocks(model)[i]
        block.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in block.named_parameters():
                p.copy_(load_tensor(stored[f"{prefix}.{i}.{name}"]))
    return model


def write_entries(out: Path, tensors: dict[str, Entry], max_shard_bytes: int = 5 << 30) -> None:
    """Write into the directory `out` safetensors shards holding `tensors` (name -> where its bytes
    are), byte-copied, with the standard index when there is more than one shard (so plain
    `from_pretrained` loads them)."""
    shards: list[dict[str, Entry]] = [{}]
    size = 0
    for new, e in tensors.items():
        if shards[-1] and size + (e.end - e.start) > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][new] = e
        size += e.end - e.start
    if len(shards) == 1:
        write_from_ranges(out / SINGLE, shards[0], {"format": "pt"})
        return
    weight_map = {}
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        write_from_ranges(out / name, shard, {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(e.end - e.start for shard in shards for e in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
