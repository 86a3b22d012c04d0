"""`--config FILE.yaml` on every command: option values from a file, command-line flags on top."""

from __future__ import annotations

import json

import pytest
from helpers import expect_error
from tiny import CORPUS, DEPTH, save_tiny

from data_owner.cli import main as data_owner
from owner.cli import main as owner


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("config")
    save_tiny("llama", root / "model")
    (root / "d.txt").write_text(CORPUS)
    (root / "pkg.yaml").write_text(
        f"model: {root / 'model'}\nemulator_layers: 2\nselection: uniform\nadapter-blocks: [0, 1, {DEPTH - 2}, {DEPTH - 1}]\n"
    )
    assert (
        owner(
            ["package-emulator", "--config", str(root / "pkg.yaml"), "--out", str(root / "bundle")]
        )
        == 0
    )
    return root


def test_a_config_file_sets_options_and_flags_override_it(made, tmp_path, capsys):
    manifest = json.loads((made / "bundle" / "offsite_manifest.json").read_text())
    assert manifest["emulator"]["strategy"] == "uniform" and len(manifest["emulator"]["kept"]) == 2
    run = tmp_path / "run.yaml"
    run.write_text(f"bundle: {made / 'bundle'}\ndata: {made / 'd.txt'}\nmax-steps: 5\nblock_size: 16\n"
                   "batch-size: 2\nval-fraction: 0\nlow-memory: false\n")  # fmt: skip
    capsys.readouterr()
    assert (
        data_owner(
            ["finetune", "--config", str(run), "--out", str(tmp_path / "a"), "--max-steps", "2"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["steps"] == 2  # the flag wins over the file's 5


@pytest.mark.parametrize(
    "text, message",
    [
        ("max-stepz: 3\n", "unknown option 'max-stepz'"),
        ("max-steps: [1\n", "not valid YAML"),
        ("- 1\n- 2\n", "must be a mapping"),
        ("low-memory: 3\n", "'low-memory' is a switch"),
        ("max-steps: lots\n", "--max-steps: invalid int value"),
    ],
)
def test_a_bad_config_file_is_a_one_line_error(made, tmp_path, capsys, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    argv = ["finetune", "--config", str(bad), "--bundle", str(made / "bundle"), "--data", str(made / "d.txt"),
            "--out", str(tmp_path / "a")]  # fmt: skip
    expect_error(capsys, data_owner, argv, message, tmp_path / "a")


def test_a_config_file_is_an_input_no_output_may_overwrite(made, tmp_path, capsys):
    cfg = tmp_path / "w" / "run.yaml"
    cfg.parent.mkdir()
    cfg.write_text("max-steps: 1\n")
    expect_error(capsys, data_owner, ["finetune", "--config", str(cfg), "--bundle", str(made / "bundle"), "--data",
                                      str(made / "d.txt"), "--out", str(cfg.parent), "--overwrite"], "contains --config")  # fmt: skip
    assert cfg.is_file()
