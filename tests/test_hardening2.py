"""Regression tests for the second adversarial review (issue 26): each failed before its fix."""

from __future__ import annotations

import json

import pytest
from exchange_env import make_env, untrained_adapter
from helpers import expect_error
from tiny import CORPUS

from data_owner.cli import build_parser as data_owner_parser
from data_owner.cli import main as data_owner
from offsite.atomic import sha256_file
from offsite.exchange.home import open_home
from offsite_cli.paths import INPUTS, NOT_PATHS, OUTPUTS
from owner.cli import build_parser as owner_parser
from owner.cli import main as owner


def _snapshot(folder):
    return {
        str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture
def env(tmp_path):
    home, creds, bundles = make_env(tmp_path, ["alice"])
    creds["alice"].save(tmp_path / "alice.creds")
    (tmp_path / "d.txt").write_text(CORPUS)
    adapter = untrained_adapter(bundles["alice"], creds["alice"], tmp_path / "adapter")
    return home, tmp_path, bundles["alice"], adapter


# 2. no output onto an input, whatever --overwrite says
def test_no_command_writes_over_the_owner_home_or_another_input(env, capsys):
    home, root, bundle, adapter = env
    h, model = str(home.root), str(root / "model")
    before = {
        "home": _snapshot(home.root),
        "bundle": _snapshot(bundle.path),
        "model": _snapshot(root / "model"),
    }
    expect_error(capsys, owner, ["merge-adapter", "--home", h, "--model", model, "--adapter", str(adapter),
                                 "--out", h, "--overwrite"], "overlaps --home")  # fmt: skip
    expect_error(capsys, owner, ["package-emulator", "--home", h, "--for", "alice", "--model", model,
                                 "--out", h, "--overwrite"], "overlaps --home")  # fmt: skip
    expect_error(capsys, owner, ["package-emulator", "--home", h, "--for", "alice", "--model", model,
                                 "--out", str(home.root / "bundles" / "x")], "overlaps --home")  # fmt: skip
    for out in (bundle.path, root / "model"):
        expect_error(capsys, owner, ["evaluate-offsite", "--model", model, "--bundle", str(bundle.path),
                                     "--train", str(root / "d.txt"), "--test", str(root / "d.txt"),
                                     "--out", str(out), "--overwrite"], "overlaps")  # fmt: skip
    (root / "w").mkdir()
    (root / "w" / "alice.creds").write_bytes((root / "alice.creds").read_bytes())
    expect_error(capsys, data_owner, ["finetune", "--bundle", str(bundle.path), "--credentials", str(root / "w" / "alice.creds"),
                                      "--data", str(root / "d.txt"), "--out", str(root / "w"), "--overwrite"],
                 "contains --credentials")  # fmt: skip
    assert (root / "w" / "alice.creds").is_file()
    after = {
        "home": _snapshot(home.root),
        "bundle": _snapshot(bundle.path),
        "model": _snapshot(root / "model"),
    }
    assert after == before
    assert (root / "alice.creds").is_file()


def _commands(parser):
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices.items()


@pytest.mark.parametrize("parser", [owner_parser, data_owner_parser], ids=["owner", "data-owner"])
def test_every_string_argument_is_known_as_input_output_or_not_a_path(parser):
    """A new path argument must be given a role, or the overlap check would not see it."""
    for name, p in _commands(parser()):
        for action in p._actions:
            if (
                action.dest in ("help", "verbose")
                or action.nargs == 0
                or action.type not in (None, str)
            ):
                continue
            assert action.dest in {**OUTPUTS, **INPUTS} or action.dest in NOT_PATHS, (
                f"{name} {action.dest}"
            )


# 4. enroll writes the credentials first: a bad --out leaves no enrolled name behind
def test_enroll_to_a_missing_folder_enrolls_nobody(env, capsys):
    home, root, _, _ = env
    expect_error(capsys, owner, ["enroll", "--home", str(home.root), "--name", "bob", "--out", str(root / "no" / "bob.creds")],
                 "no such directory")  # fmt: skip
    with open_home(home.root).registry() as registry:
        assert registry.data_owner("bob") is None
    assert (
        owner(
            ["enroll", "--home", str(home.root), "--name", "bob", "--out", str(root / "bob.creds")]
        )
        == 0
    )
    assert json.loads((root / "bob.creds").read_text())["name"] == "bob"
