"""A flag a command takes must be one it uses: every parser's options against what the command
reads of `args` (itself, its inner functions, and every function it hands `args` to)."""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest

from data_owner.cli import build_parser as data_owner_parser
from owner.cli import build_parser as owner_parser

IGNORED = {"help", "verbose", "command", "func", "config"}  # --config: read by the runner


def _read(fn, seen: set) -> set[str]:
    """Attributes of `args` that `fn` reads, following calls that pass `args` on."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    names: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "args"
        ):
            names.add(node.attr)
        if not isinstance(node, ast.Call):
            continue
        passed = [a for a in node.args if isinstance(a, ast.Name) and a.id == "args"]
        if isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") and passed:
            names.add(node.args[1].value)
        elif passed and isinstance(node.func, ast.Name):
            callee = fn.__globals__.get(node.func.id)
            if inspect.isfunction(callee) and callee not in seen:
                seen.add(callee)
                names |= _read(callee, seen)
    return names


def _commands():
    for prog, build in (("owner", owner_parser), ("data-owner", data_owner_parser)):
        sub = next(a for a in build()._actions if a.dest == "command")
        for name, parser in sub.choices.items():
            yield f"{prog} {name}", parser


@pytest.mark.parametrize(
    "name, parser", list(_commands()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_option_is_used_by_its_command(name, parser):
    func = parser.get_default("func")
    taken = {a.dest for a in parser._actions} - IGNORED
    unused = taken - _read(func, {func})
    assert not unused, f"{name} takes {sorted(unused)} and ignores them"
