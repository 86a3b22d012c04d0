"""`--config FILE.yaml` on every command: a file of option values, the command line's flags on top.

The file is a YAML mapping from option names (`max-steps` or `max_steps`) to values; it is turned
into the flags it stands for and parsed by the same parser, so a value is checked exactly as on
the command line, and flags given on the command line come after it and win (torchtune's
convention). Repeatable options take a list.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from offsite.errors import OffsiteError
from offsite.settings import read_yaml


def add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="option values from a YAML file (keys are option names); flags given here override them")  # fmt: skip


def _config_path(argv: list[str]) -> str | None:
    for i, token in enumerate(argv):
        if token == "--config":
            if i + 1 >= len(argv):
                raise OffsiteError("--config needs a file")
            return argv[i + 1]
        if token.startswith("--config="):
            return token.split("=", 1)[1]
    return None


def _load(path: str) -> dict:
    p = Path(path)
    try:
        data = read_yaml(p)
    except OffsiteError as e:
        raise OffsiteError(f"--config {e}") from None
    if not isinstance(data, dict):
        raise OffsiteError(f"--config {p}: must be a mapping of option names to values")
    return data


def _flags(path: str, data: dict, sub: argparse.ArgumentParser) -> list[str]:
    actions = {o: a for a in sub._actions for o in a.option_strings}
    out: list[str] = []
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        action = actions.get(flag)
        if action is None or flag in ("--config", "--help"):
            known = sorted(
                o[2:] for o in actions if o.startswith("--") and o not in ("--config", "--help")
            )
            raise OffsiteError(f"--config {path}: unknown option {key!r} for this command; options are {', '.join(known)}")  # fmt: skip
        if action.nargs == 0:  # a switch
            if not isinstance(value, bool):
                raise OffsiteError(f"--config {path}: {key!r} is a switch; give true or false")
            out += [flag] if value else []
        elif isinstance(value, list):
            if isinstance(action, argparse._AppendAction):
                for v in value:
                    out += [flag, _text(v)]
            elif action.nargs in ("+", "*"):
                out += [flag, *map(_text, value)]
            else:
                out += [
                    flag,
                    ",".join(map(_text, value)),
                ]  # comma lists: --adapter-blocks 0,1,28,29
        elif value is not None:
            out += [flag, _text(value)]
    return out


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def expand_config(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` with the flags `--config FILE` holds placed before the others (`--config` itself stays:
    the file is an input the overlap check protects)."""
    path = _config_path(argv)
    if path is None:
        return argv
    sub_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    at = next((i for i, t in enumerate(argv) if t in sub_action.choices), None)
    if at is None:
        raise OffsiteError(
            "--config goes after the command, e.g. `data-owner finetune --config run.yaml`"
        )
    return argv[: at + 1] + _flags(path, _load(path), sub_action.choices[argv[at]]) + argv[at + 1 :]
