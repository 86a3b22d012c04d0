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


def _library_strings():
    """(file, line, text) of every string in offsite/ that is not a docstring or generated code."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "offsite"
    for f in sorted(root.rglob("*.py")):
        if "v1" in f.parts:
            continue
        tree = ast.parse(f.read_text())
        docs = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and n.body
            and isinstance(n.body[0], ast.Expr)
        }
        for n in ast.walk(tree):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
                yield f.relative_to(root.parent), n.lineno, n.value


def test_the_library_names_spec_fields_not_flags():
    import re

    flags = [
        (f, line, m[0])
        for f, line, text in _library_strings()
        for m in re.finditer(r"(?<![\w-])--[a-z][a-z-]+", text)
        if m[0] != "--no-deps"  # pip's, in the install hint for a model package
    ]
    assert not flags, f"library messages name CLI flags (name the spec field in backticks): {flags}"


def test_every_field_a_message_names_has_its_flag():
    from offsite.errors import FIELD
    from offsite_cli.flags import FLAGS

    named = {m for _, _, text in _library_strings() for m in FIELD.findall(text)}
    # fields of nested specs are named bare inside them; the CLIs prefix them (spec_fields)
    nested = {"method", "rank", "alpha", "dropout", "targets", "virtual_tokens", "epsilon", "delta", "accountant",
              "steps", "inputs", "noise", "grad_weight"}  # fmt: skip
    missing = sorted(named - set(FLAGS) - nested)
    assert not missing, (
        f"fields named in library messages with no flag in offsite_cli/flags.py: {missing}"
    )


@pytest.mark.parametrize(
    "argv, shown",
    [
        (
            ["evaluate-offsite", "--bundle", "b", "--out", "o", "--task", "t", "--steps", "0"],
            "--steps must be at least 1",
        ),
        (
            ["package-emulator", "--out", "o", "--distill-lr", "-1", "--distill-data", "d"],
            "--distill-lr must be",
        ),
        (
            ["package-emulator", "--out", "o", "--layerwise-noise", "-1"],
            "--layerwise-noise must be >= 0",
        ),
        (["package-emulator", "--out", "o", "--home", "h"], "--home and --for go together"),
    ],
)
def test_library_errors_show_the_flag(argv, shown, tmp_path, monkeypatch, capsys):
    from owner.cli import main as owner

    monkeypatch.chdir(tmp_path)
    assert owner(argv) == 2
    err = capsys.readouterr().err
    assert shown in err and "`" not in err and len(err.strip().splitlines()) == 1, err


def test_nested_fields_show_their_flag(tmp_path, capsys):
    from data_owner.cli import main as data_owner

    (tmp_path / "d.txt").write_text("text\n")
    (tmp_path / "b").mkdir()
    base = [
        "finetune",
        "--bundle",
        str(tmp_path / "b"),
        "--data",
        str(tmp_path / "d.txt"),
        "--out",
        str(tmp_path / "a"),
    ]
    for extra, shown in (
        (["--peft", "lora", "--lora-rank", "0"], "--lora-rank"),
        (
            ["--dp-epsilon", "8", "--dp-accountant", "moments"],
            None,
        ),  # argparse's choices refuse it first
        (["--dp-epsilon", "8", "--dp-delta", "2"], "--dp-delta 2.0 must be in (0, 1)"),
        (["--max-steps", "0"], "--max-steps must be at least 1"),
    ):
        assert data_owner([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert "`" not in err and (shown is None or shown in err), err
