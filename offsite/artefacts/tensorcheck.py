"""Checks on received safetensors files: header, exact key set, shapes, dtypes, finite values."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from offsite.errors import VerificationError

TensorSpec = dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype name, shape)


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32."""
    return str(dtype).removeprefix("torch.")


def spec_of(state: dict[str, torch.Tensor]) -> TensorSpec:
    """The (dtype, shape) of each tensor."""
    return {k: (dtype_name(v.dtype), tuple(v.shape)) for k, v in state.items()}


def spec_bytes(spec: TensorSpec) -> int:
    """Bytes the tensors of `spec` take (a dtype name torch does not know counts 2 bytes a value)."""
    total = 0
    for dtype, shape in spec.values():
        torch_dtype = getattr(torch, dtype, None)
        size = (
            torch.empty(0, dtype=torch_dtype).element_size()
            if isinstance(torch_dtype, torch.dtype)
            else 2
        )
        total += math.prod(shape) * size
    return total


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of a floating tensor is finite. NaN and the infinities show in the
    extremes, and a min/max reduction makes no temporary as large as the tensor: 50x faster than
    `isfinite(t).all()` on a bf16 block (4 ms against 0.2 s for 51M values, one core)."""
    if not t.is_floating_point() or not t.numel():
        return True
    try:
        lo, hi = torch.aminmax(t)
    except NotImplementedError:  # dtypes without the reduction (float8)
        return bool(torch.isfinite(t.float()).all())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _preview(names: set[str]) -> str:
    items = sorted(names)
    return ", ".join(items[:3]) + (f" (+{len(items) - 3} more)" if len(items) > 3 else "")


def check_spec(where: str, actual: TensorSpec, expected: TensorSpec) -> None:
    """Raise unless the key set, dtypes and shapes match exactly."""
    missing, extra = set(expected) - set(actual), set(actual) - set(expected)
    if missing:
        raise VerificationError(f"{where}: missing tensors {_preview(missing)}")
    if extra:
        raise VerificationError(f"{where}: unexpected tensors {_preview(extra)}")
    for name, (dtype, shape) in expected.items():
        got_dtype, got_shape = actual[name]
        if tuple(got_shape) != tuple(shape):
            raise VerificationError(
                f"{where}: tensor {name} has shape {list(got_shape)}, expected {list(shape)}"
            )
        if got_dtype != dtype:
            raise VerificationError(
                f"{where}: tensor {name} has dtype {got_dtype}, expected {dtype}"
            )


MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


def check_header(path: Path) -> None:
    """Refuse a header whose declared length runs past the file or any sane size, or is not JSON."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            length = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if not 2 <= length <= min(MAX_HEADER_BYTES, path.stat().st_size - 8):
                raise VerificationError(
                    f"{path}: not a valid safetensors file (header length {length})"
                )
            header = json.loads(f.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise VerificationError(
            f"{path}: not a valid safetensors file (malformed header)"
        ) from None
    if not isinstance(header, dict):
        raise VerificationError(f"{path}: not a valid safetensors file (header is not an object)")


def header_spec(path: Path) -> TensorSpec:
    """Dtype and shape of every tensor in a safetensors file, from its header alone."""
    check_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {
                name: (
                    st_dtype(f.get_slice(name).get_dtype()),
                    tuple(f.get_slice(name).get_shape()),
                )
                for name in f.keys()
            }
    except (SafetensorError, OSError, ValueError) as e:
        raise VerificationError(f"{path}: not a valid safetensors file ({e})") from None


class CheckedTensors(Mapping):
    """The tensors of a safetensors file whose header matched `expected`, each read (and checked
    finite) only when asked for: a large adapter need not be in memory all at once."""

    def __init__(self, path: str | os.PathLike, expected: TensorSpec) -> None:
        self.path, self.names = Path(path), list(expected)
        check_spec(str(self.path), header_spec(self.path), expected)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                t = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise VerificationError(f"{self.path}: not a valid safetensors file ({e})") from None
        if not all_finite(t):
            raise VerificationError(f"{self.path}: tensor {name} contains NaN or Inf values")
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def load_checked(path: str | os.PathLike, expected: TensorSpec) -> dict[str, torch.Tensor]:
    """Load a safetensors file after checking its header against `expected`, then check values are finite."""
    return dict(CheckedTensors(path, expected).items())


_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip


ST_CODES = {name: code for code, name in _ST_DTYPES.items()}


def st_dtype(code: str) -> str:
    """'bfloat16' for the safetensors dtype code 'BF16'."""
    return _ST_DTYPES.get(code, code.lower())
