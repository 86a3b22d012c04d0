"""Run a CLI command: user mistakes become one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

from offsite.errors import OffsiteError
from offsite_cli.config import add_config, expand_config
from offsite_cli.flags import worded
from offsite_cli.paths import check_outputs_apart

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own is two lines; keep ours to one
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser whose sub-commands set `func`, with one-line usage errors."""
    parser = _Parser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    return parser


class _Commands(argparse._SubParsersAction):
    """Sub-commands that each take --config FILE.yaml."""

    def add_parser(self, name, **kwargs):
        sub = super().add_parser(name, **kwargs)
        add_config(sub)
        return sub


def subparsers(parser: argparse.ArgumentParser):
    """Sub-command registry for `parser` (each sub-parser errors in one line and takes --config)."""
    return parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser, action=_Commands
    )


def _quiet_libraries(verbose: bool) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse `argv`, run the chosen command, and map OffsiteError to exit code 2."""
    try:
        argv = expand_config(parser, list(sys.argv[1:] if argv is None else argv))
    except OffsiteError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage errors (code 2) and --help (code 0), already printed
        return int(e.code or 0)
    _quiet_libraries(args.verbose)
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        check_outputs_apart(args)  # every command, before it writes anything
        return int(func(args) or 0)
    except OffsiteError as e:
        print(f"{parser.prog}: error: {worded(e, args.command)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # the machine, not the user: disk full, permissions, a vanished file
        where = f": {e.filename}" if e.filename else ""
        print(
            f"{parser.prog}: error: {e.strerror or e}{where}; nothing half-written was kept",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def print_json(obj) -> None:
    """Machine-readable result on stdout."""
    print(json.dumps(obj, indent=2, sort_keys=True))
