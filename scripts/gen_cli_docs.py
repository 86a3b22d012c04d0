"""Write docs/cli.md, the CLI reference, from the two parsers (so it cannot drift from them).

python -m scripts.gen_cli_docs          # rewrite docs/cli.md
python -m scripts.gen_cli_docs --check  # exit 1 when docs/cli.md is not what the parsers say
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def _commands(parser: argparse.ArgumentParser):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices.items()


def render() -> str:
    """The reference: each command's `--help`, as argparse prints it at 100 columns."""
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal; the page must not depend on it
    from data_owner.cli import build_parser as data_owner_parser
    from owner.cli import build_parser as owner_parser

    out = ["# CLI reference", "",
           "Generated from the parsers by `python -m scripts.gen_cli_docs`; `make docs` fails when it is stale.", ""]  # fmt: skip
    for prog, build in (("owner", owner_parser), ("data-owner", data_owner_parser)):
        parser = build()
        out += [f"## `{prog}`", "", parser.description or "", ""]
        for name, sub in _commands(parser):
            out += [f"### `{prog} {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check that docs/cli.md is current")
    text = render()
    if p.parse_args().check:
        if not DOC.is_file() or DOC.read_text() != text:
            sys.exit(f"{DOC} is stale: run `python -m scripts.gen_cli_docs` and commit it")
        return
    DOC.write_text(text)


if __name__ == "__main__":
    main()
