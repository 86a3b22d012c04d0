"""The docs that are generated or promised stay true: the CLI reference matches the parsers."""

from __future__ import annotations

from pathlib import Path

from scripts.gen_cli_docs import DOC, render

ROOT = Path(__file__).resolve().parents[1]


def test_the_cli_reference_is_what_the_parsers_say():
    assert DOC.read_text() == render(), "docs/cli.md is stale: run `python -m scripts.gen_cli_docs`"


def test_the_readme_stays_short_and_its_doc_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for target in [part.split(")")[0] for part in text.split("](")[1:]]:
        if not target.startswith("http"):
            assert (ROOT / target).is_file(), target
