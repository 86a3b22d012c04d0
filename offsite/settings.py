"""Frozen dataclass settings as data: to and from plain mappings, and YAML files.

`to_data` turns a settings dataclass (`TrainConfig`, `EmulatorRecipe`, `LayerwiseConfig`, an
evaluation spec...) into a mapping of YAML-ready values (paths as text, tuples as lists, nested
settings as nested mappings); `from_data` builds one back from such a mapping, field by field
from the class's type hints, so a value is checked by the class's own `__post_init__` exactly as
in code. A wrong key or a value of the wrong kind is an `OffsiteError` naming the field
(`distill.learning_rate`) and where it came from (the file).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml

from offsite.errors import OffsiteError

T = TypeVar("T")


class SettingsFileError(OffsiteError):
    """A settings file's mistake: its fields keep the file's names (a CLI shows no flag for them)."""

    def reworded(self, name) -> str:
        return str(self)


def to_data(obj: Any) -> Any:
    """`obj` (a settings dataclass, or a value inside one) as plain YAML-ready data."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, (tuple, list)):
        return [to_data(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_data(v) for k, v in obj.items()}
    return obj


def dump_yaml(obj: Any) -> str:
    """`obj` as a YAML document (fields in the class's order)."""
    return yaml.safe_dump(to_data(obj), sort_keys=False, default_flow_style=False)


def from_data(cls: type[T], data: Any, where: str = "settings") -> T:
    """A `cls` from a mapping of its fields (missing fields take the class's defaults)."""
    return _build(cls, data, where, "")


def read_yaml(path: Path) -> Any:
    """The YAML document in the file at `path` (an empty file: an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise SettingsFileError(f"{path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SettingsFileError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return {} if raw is None else raw


def load_yaml(cls: type[T], path: Path) -> T:
    """A `cls` from the YAML file at `path` (an empty file: the defaults)."""
    return from_data(cls, read_yaml(path), str(path))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, data: Any, where: str, prefix: str) -> Any:
    name = prefix.rstrip(".") or cls.__name__
    if not isinstance(data, dict):
        raise SettingsFileError(f"{where}: `{name}` must be a mapping of field names to values")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise SettingsFileError(
            f"{where}: unknown field `{prefix}{unknown[0]}`; fields are {', '.join(fields)}"
        )
    missing = [k for k, f in fields.items() if k not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]  # fmt: skip
    if missing:
        raise SettingsFileError(f"{where}: `{prefix}{missing[0]}` is required")
    hints = _hints(cls)
    values = {k: _value(hints[k], v, where, f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except OffsiteError as e:
        message = e.reworded(lambda field: f"`{prefix}{field}`")
        raise SettingsFileError(f"{where}: {message}") from None


def _value(hint: Any, value: Any, where: str, field: str) -> Any:
    """`value` as the type `hint` names (the field's name for the message)."""
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise SettingsFileError(f"{where}: `{field}` cannot be empty")
    kinds = [o for o in options if o is not type(None)]
    for kind in kinds:
        if dataclasses.is_dataclass(kind):
            return _build(kind, value, where, field + ".")
    for kind in kinds:
        converted = _as(kind, value)
        if converted is not _NO:
            return converted
    wanted = " or ".join(_name(k) for k in kinds)
    raise SettingsFileError(f"{where}: `{field}` must be {wanted} (got {value!r})")


_NO = object()


def _as(kind: Any, value: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin is tuple:
        args = typing.get_args(kind)
        if (
            not isinstance(value, (list, tuple))
            or (len(args) != 2 or args[1] is not Ellipsis)
            and len(value) != len(args)
        ):
            return _NO
        each = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        items = [_as(k, v) for k, v in zip(each, value, strict=True)]
        return _NO if any(i is _NO for i in items) else tuple(items)
    if origin is dict:
        return dict(value) if isinstance(value, dict) else _NO
    if kind is torch.dtype:
        dtype = getattr(torch, value, None) if isinstance(value, str) else None
        return dtype if isinstance(dtype, torch.dtype) else _NO
    if kind is Path:
        return Path(value) if isinstance(value, str) and value else _NO
    if kind is bool:
        return value if isinstance(value, bool) else _NO
    if kind is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else _NO
    if kind is str:
        return value if isinstance(value, str) else _NO
    if kind is Any:
        return value
    return _NO


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _name(kind: Any) -> str:
    names = {int: "a whole number", float: "a number", str: "text", bool: "true or false",
             Path: "a path", torch.dtype: "a torch dtype (e.g. bfloat16)"}  # fmt: skip
    if typing.get_origin(kind) is tuple:
        return "a list"
    return names.get(kind, getattr(kind, "__name__", str(kind)))
