"""Settings as data: TrainConfig, EmulatorRecipe, LayerwiseConfig and the evaluation spec to and from
YAML; the recipe a bundle records, re-run from the bundle; `package-emulator --recipe`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import expect_error
from tiny import CORPUS, save_tiny

from offsite.artefacts.peft_delta import PeftOptions
from offsite.emulator.layerwise import LayerwiseConfig
from offsite.emulator.recipe import EmulatorRecipe
from offsite.errors import OffsiteError
from offsite.recipes.evaluate import EvaluateSpec
from offsite.settings import dump_yaml, from_data, load_yaml
from offsite.training.config import TrainConfig
from offsite.training.privacy import DPConfig
from owner.cli import main as owner

SETTINGS = [
    TrainConfig(),
    TrainConfig(max_steps=7, learning_rate=3e-3, dp=DPConfig(epsilon=8, delta=1e-5), schedule_part=(1, 3)),
    EmulatorRecipe(),
    EmulatorRecipe(layerwise=None, selection="uniform", prune=0.25, distill_data=Path("corpus.txt")),
    LayerwiseConfig(steps=9, inputs="teacher", grad_weight=1.0),
    EvaluateSpec(bundle=Path("b"), out=Path("o"), tasks=("sst2", "arc-easy"), train=TrainConfig(max_steps=3),
                 dtype=torch.bfloat16, peft=PeftOptions(method="lora", rank=4)),
]  # fmt: skip


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: type(s).__name__)
def test_settings_round_trip_through_yaml(settings, tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(dump_yaml(settings))
    assert load_yaml(type(settings), path) == settings


def test_an_empty_file_is_the_defaults(tmp_path):
    (tmp_path / "e.yaml").write_text("")
    assert load_yaml(EmulatorRecipe, tmp_path / "e.yaml") == EmulatorRecipe()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"distill": {"learning_rate": -1}}, "r.yaml: `distill.learning_rate` must be positive"),
        ({"layerwise": {"stepz": 3}}, "r.yaml: unknown field `layerwise.stepz`; fields are steps,"),
        ({"prune": "a lot"}, "r.yaml: `prune` must be a number (got 'a lot')"),
        ({"distill": {"dp": {"epsilon": 1}}}, "r.yaml: `distill.dp.delta` is required"),
        ({"distill": [1, 2]}, "r.yaml: `distill` must be a mapping"),
        ({"block_size": True}, "r.yaml: `block_size` must be a whole number"),
        ({"selection": None}, "r.yaml: `selection` cannot be empty"),
    ],
)
def test_a_bad_field_names_the_file_and_the_field(data, message):
    with pytest.raises(OffsiteError) as e:
        from_data(EmulatorRecipe, data, "r.yaml")
    assert message in str(e.value)
    # the file's own field names stay (a CLI shows no flag for a field of a file)
    assert e.value.reworded(lambda f: "--flag") == str(e.value)


def test_not_yaml_and_no_file_are_one_line_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(OffsiteError, match=r"bad.yaml: not valid YAML"):
        load_yaml(TrainConfig, tmp_path / "bad.yaml")
    with pytest.raises(OffsiteError, match=r"nope.yaml: no such file"):
        load_yaml(TrainConfig, tmp_path / "nope.yaml")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    save_tiny("llama", root / "model")
    (root / "sample.txt").write_text(CORPUS)
    return root


def _package(root: Path, out: Path, *extra: str) -> int:
    return owner(["package-emulator", "--model", str(root / "model"), "--out", str(out), "--emulator-layers", "2",
                  *extra])  # fmt: skip


def test_a_recipe_file_makes_the_bundle_and_the_bundle_records_it(model, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("selection: redundancy\nselection_data: sample.txt\nblock_size: 16\n"
                      "layerwise: {steps: 3, max_sequences: 4, learning_rate: 0.001}\n")  # fmt: skip
    (tmp_path / "sample.txt").write_text(CORPUS)  # found beside the recipe file
    assert _package(model, tmp_path / "b1", "--recipe", str(recipe)) == 0
    manifest = json.loads((tmp_path / "b1" / "offsite_manifest.json").read_text())
    record = manifest["emulator_recipe"]["recipe"]
    assert record["settings"]["layerwise"]["steps"] == 3 and record["settings"]["block_size"] == 16
    # the data file by name and sha256, not where it lies on the owner's disk; no checkpoint settings
    assert record["settings"]["selection_data"] == "sample.txt"
    assert str(tmp_path) not in json.dumps(record) and "checkpoint_dir" not in record["settings"]
    assert set(record["files"]) == {"selection_data"}
    # re-run from the bundle, its data file given again: the same emulator
    args = ["--recipe", str(tmp_path / "b1"), "--selection-data", str(tmp_path / "sample.txt")]
    assert _package(model, tmp_path / "b2", *args) == 0
    again = json.loads((tmp_path / "b2" / "offsite_manifest.json").read_text())
    assert again["emulator_recipe"]["recipe"] == record
    assert again["emulator"]["kept"] == manifest["emulator"]["kept"]
    assert again["files"] == manifest["files"]


def test_a_recipe_is_refused_with_other_recipe_options_or_other_data(model, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("selection: uniform\nlayerwise: null\n")
    out = tmp_path / "b"
    expect_error(capsys, owner, ["package-emulator", "--model", str(model / "model"), "--out", str(out),
                                 "--recipe", str(recipe), "--layerwise-lr", "0.1"],
                 "--recipe and --layerwise-lr both set the recipe", absent=out)  # fmt: skip
    recipe.write_text("selection: uniform\nlayerwise: {steps: 0}\n")
    expect_error(capsys, owner, ["package-emulator", "--model", str(model / "model"), "--out", str(out),
                                 "--recipe", str(recipe)], f"{recipe}: `layerwise.steps`", absent=out)  # fmt: skip
    recipe.write_text(f"selection_data: {model / 'sample.txt'}\nlayerwise: null\nblock_size: 16\n")
    assert _package(model, tmp_path / "made", "--recipe", str(recipe)) == 0
    other = tmp_path / "other.txt"
    other.write_text(CORPUS + " more")
    expect_error(capsys, owner, ["package-emulator", "--model", str(model / "model"), "--out", str(out),
                                 "--recipe", str(tmp_path / "made"), "--selection-data", str(other)],
                 "is not the file", absent=out)  # fmt: skip
