"""Regression tests for the adversarial review (issue 11): each fails on the code before its fix."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest
import torch
from exchange_env import make_env, signer_of, untrained_adapter
from helpers import expect_error
from safetensors.torch import save_file
from tiny import CORPUS, DEPTH, save_tiny, tiny_model

from data_owner.cli import main as data_owner
from offsite.artefacts.adapter import (
    ADAPTER_MANIFEST,
    ADAPTER_SIGNATURE,
    WEIGHTS_NAME,
    open_adapter,
)
from offsite.artefacts.bundle import MANIFEST_NAME, SIGNATURE_NAME, open_bundle
from offsite.artefacts.manifest import hash_files
from offsite.artefacts.merge import MERGE_RECORD
from offsite.atomic import sha256_file
from offsite.emulator.package import package_emulator
from offsite.emulator.plan import make_plan
from offsite.errors import OffsiteError
from offsite.exchange.home import open_home
from offsite.training.config import TrainConfig
from offsite.training.finetune import FinetuneJob, finetune_bundle
from owner.cli import main as owner

TRAIN = ["--max-steps", "2", "--block-size", "16", "--batch-size", "2", "--learning-rate", "1e-2"]


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """A tiny model, a bundle of it, the corpus, and one unsigned adapter trained through the CLI."""
    root = tmp_path_factory.mktemp("hard")
    save_tiny("llama", root / "model")
    (root / "data").mkdir()
    (root / "data" / "corpus.txt").write_text(CORPUS)
    assert owner(["package-emulator", "--model", str(root / "model"), "--out", str(root / "bundle"),
                  "--emulator-layers", "2", "--selection", "uniform"]) == 0  # fmt: skip
    assert data_owner(["finetune", "--bundle", str(root / "bundle"), "--data", str(root / "data" / "corpus.txt"),
                       "--out", str(root / "adapter"), *TRAIN]) == 0  # fmt: skip
    return root


def _finetune(flow, out, *extra):
    return ["finetune", "--bundle", str(flow / "bundle"), "--data", str(flow / "data" / "corpus.txt"),
            "--out", str(out), *TRAIN, *extra]  # fmt: skip


# 1. --checkpoint-dir never deletes what the run did not create
def test_checkpoint_dir_keeps_other_files(flow, tmp_path, capsys):
    ckpt = tmp_path / "mine"
    ckpt.mkdir()
    (ckpt / "notes.txt").write_text("precious")
    expect_error(capsys, data_owner, _finetune(flow, tmp_path / "a", "--checkpoint-dir", str(ckpt)),
                 "not offsite checkpoints", tmp_path / "a")  # fmt: skip
    assert (ckpt / "notes.txt").read_text() == "precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        data_owner(
            _finetune(flow, tmp_path / "b", "--checkpoint-dir", str(empty), "--save-every", "1")
        )
        == 0
    )
    assert not empty.exists(), "a folder holding only our checkpoints is removed after success"
    expect_error(capsys, data_owner, _finetune(flow, tmp_path / "c", "--checkpoint-dir", str(flow / "data")),
                 "contains --data", tmp_path / "c")  # fmt: skip
    assert (flow / "data" / "corpus.txt").is_file()


# 2. offline merge: the key set comes from the bundle, and the signature is checked
def test_adapter_claiming_every_block_is_refused(flow, tmp_path, capsys):
    bad = tmp_path / "evil"
    shutil.copytree(flow / "adapter", bad)
    model = tiny_model("llama")
    state = {
        k: torch.zeros_like(v)
        for k, v in model.state_dict().items()
        if k.startswith("model.layers.")
    }
    save_file(state, str(bad / WEIGHTS_NAME))
    manifest = json.loads((bad / ADAPTER_MANIFEST).read_text())
    manifest.update(adapter_blocks=list(range(DEPTH)),
                    tensors={k: {"dtype": "float32", "shape": list(v.shape)} for k, v in state.items()})  # fmt: skip
    manifest["files"][WEIGHTS_NAME] = sha256_file(bad / WEIGHTS_NAME)
    (bad / ADAPTER_MANIFEST).write_text(json.dumps(manifest))
    expect_error(capsys, owner, ["merge-adapter", "--model", str(flow / "model"), "--adapter", str(bad), "--bundle",
                                 str(flow / "bundle"), "--allow-unsigned", "--out", str(tmp_path / "m")],
                 "but the bundle's adapter blocks are [0, 1, 6, 7]", tmp_path / "m")  # fmt: skip
    expect_error(capsys, owner, ["merge-adapter", "--model", str(flow / "model"), "--adapter", str(bad),
                                 "--allow-unsigned", "--out", str(tmp_path / "m")], "--bundle is required", tmp_path / "m")  # fmt: skip


def test_offline_merge_needs_a_key_or_an_explicit_waiver(flow, tmp_path, capsys):
    base = [
        "merge-adapter",
        "--model",
        str(flow / "model"),
        "--adapter",
        str(flow / "adapter"),
        "--bundle",
        str(flow / "bundle"),
    ]
    expect_error(
        capsys, owner, [*base, "--out", str(tmp_path / "m")], "no key to check", tmp_path / "m"
    )
    from offsite.artefacts.signing import new_signing_key, public_pem

    (tmp_path / "k.pub").write_bytes(public_pem(new_signing_key().public_key()))
    expect_error(capsys, owner, [*base, "--signer-key", str(tmp_path / "k.pub"), "--out", str(tmp_path / "m")],
                 "adapter_manifest.sig: missing", tmp_path / "m")  # fmt: skip
    capsys.readouterr()
    assert owner([*base, "--allow-unsigned", "--out", str(tmp_path / "m")]) == 0
    record = json.loads((tmp_path / "m" / MERGE_RECORD).read_text())
    assert record["verified"]["signature"].startswith("not checked") and record["signer"] is None
    assert "bundle's adapter blocks" in record["verified"]["key_set"]


def test_merge_with_home_checks_the_signer(tmp_path, capsys):
    home, creds, bundles = make_env(tmp_path, ["acme", "bob"])
    adapter = untrained_adapter(bundles["acme"], creds["acme"], tmp_path / "a")
    base = [
        "merge-adapter",
        "--home",
        str(home.root),
        "--adapter",
        str(adapter),
        "--model",
        str(tmp_path / "model"),
    ]
    capsys.readouterr()
    assert owner([*base, "--out", str(tmp_path / "m")]) == 0
    assert json.loads(capsys.readouterr().out)["signer"] == "acme"
    (adapter / ADAPTER_SIGNATURE).unlink()
    expect_error(
        capsys,
        owner,
        [*base, "--out", str(tmp_path / "m2")],
        "missing; the artefact is not signed",
        tmp_path / "m2",
    )
    signer_of(creds["bob"]).sign(adapter / ADAPTER_MANIFEST, adapter / ADAPTER_SIGNATURE)
    manifest = json.loads((adapter / ADAPTER_MANIFEST).read_text())
    manifest["signer"] = "bob"  # bob signs an adapter for acme's bundle: not issued to him
    (adapter / ADAPTER_MANIFEST).write_text(json.dumps(manifest))
    signer_of(creds["bob"]).sign(adapter / ADAPTER_MANIFEST, adapter / ADAPTER_SIGNATURE)
    expect_error(
        capsys,
        owner,
        [*base, "--out", str(tmp_path / "m3")],
        "was not issued to 'bob'",
        tmp_path / "m3",
    )


# 7. outputs never overlap inputs
def test_outputs_that_would_destroy_inputs_are_refused(flow, tmp_path, capsys):
    expect_error(
        capsys, data_owner, _finetune(flow, flow / "bundle", "--overwrite"), "overlaps --bundle"
    )
    expect_error(
        capsys, data_owner, _finetune(flow, flow / "data", "--overwrite"), "contains --data"
    )
    expect_error(capsys, owner, ["merge-adapter", "--model", str(flow / "model"), "--adapter", str(flow / "adapter"),
                                 "--bundle", str(flow / "bundle"), "--allow-unsigned", "--out", str(flow / "adapter"),
                                 "--overwrite"], "overlaps --adapter")  # fmt: skip
    assert open_adapter(flow / "adapter") and open_bundle(flow / "bundle")


# 8. malformed files inside a (re-signed) bundle: one line, exit 2
def _resign(bundle, owner_home=None):
    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    manifest["files"] = hash_files(bundle, (MANIFEST_NAME, SIGNATURE_NAME))
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, message", [
    (lambda b: (b / "model.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}"), "header length"),
    (lambda b: (b / "model.safetensors").write_bytes((8).to_bytes(8, "little") + b"{nojson}"), "malformed header"),
    (lambda b: (b / "tokenizer.json").write_text('{"model": 1}'), "cannot load the tokenizer"),
    (lambda b: (b / "pytorch_model.bin").write_bytes(b"pickle"), "a file type this artefact may not hold"),
])  # fmt: skip
def test_malformed_bundle_files_are_one_line_errors(flow, tmp_path, capsys, damage, message):
    bundle = tmp_path / "b"
    shutil.copytree(flow / "bundle", bundle)
    damage(bundle)
    _resign(bundle)
    expect_error(capsys, data_owner, ["finetune", "--bundle", str(bundle), "--data", str(flow / "data" / "corpus.txt"),
                                      "--out", str(tmp_path / "a"), *TRAIN], message, tmp_path / "a")  # fmt: skip


def test_deeply_nested_manifest_is_refused(flow, tmp_path, capsys):
    bundle = tmp_path / "b"
    shutil.copytree(flow / "bundle", bundle)
    (bundle / MANIFEST_NAME).write_text("[" * 100000 + "]" * 100000)
    expect_error(capsys, data_owner, ["evaluate", "--bundle", str(bundle), "--data", str(flow / "data" / "corpus.txt")],
                 "nested too deeply")  # fmt: skip


def test_symlinks_in_a_bundle_are_refused(flow, tmp_path, capsys):
    bundle = tmp_path / "b"
    shutil.copytree(flow / "bundle", bundle)
    os.symlink(tmp_path, bundle / "elsewhere")
    expect_error(capsys, data_owner, ["evaluate", "--bundle", str(bundle), "--data", str(flow / "data" / "corpus.txt")],
                 "is a symbolic link")  # fmt: skip
    (bundle / "elsewhere").unlink()
    shutil.move(bundle / "config.json", tmp_path / "config.json")
    os.symlink(tmp_path / "config.json", bundle / "config.json")
    expect_error(capsys, data_owner, ["evaluate", "--bundle", str(bundle), "--data", str(flow / "data" / "corpus.txt")],
                 "is a symbolic link")  # fmt: skip


# 8, 9: hyper-parameters and the loss
@pytest.mark.parametrize("flag, value, message", [
    ("--weight-decay", "-5", "--weight-decay and --max-grad-norm must be >= 0"),
    ("--learning-rate", "inf", "--learning-rate must be a finite number"),
    ("--learning-rate", "nan", "--learning-rate must be a finite number"),
])  # fmt: skip
def test_bad_hyperparameters(flow, tmp_path, capsys, flag, value, message):
    expect_error(
        capsys, data_owner, _finetune(flow, tmp_path / "a", flag, value), message, tmp_path / "a"
    )


def test_non_finite_loss_stops_training(flow, tmp_path):
    job = FinetuneJob(flow / "data" / "corpus.txt", tmp_path / "a", block_size=16, val_fraction=0.0)
    with pytest.raises(OffsiteError, match="the loss became"):  # a finite but absurd rate diverges
        finetune_bundle(
            open_bundle(flow / "bundle"),
            job,
            TrainConfig(max_steps=4, batch_size=2, learning_rate=1e30),
        )
    assert not (tmp_path / "a").exists()


# 11. a relative --home works from any directory later
def test_relative_home_is_stored_absolute(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert owner(["init", "--home", "h"]) == 0
    assert open_home("h").root == tmp_path / "h"
    key = tmp_path / "h" / "signing.key"
    assert (
        stat.S_IMODE(key.stat().st_mode) == 0o600
        and stat.S_IMODE((tmp_path / "h" / "ca.key").stat().st_mode) == 0o600
    )


# 12. quantization bits
def test_quantize_bits_zero_is_refused(flow, tmp_path, capsys):
    expect_error(capsys, owner, ["package-emulator", "--model", str(flow / "model"), "--out", str(tmp_path / "b"),
                                 "--quantize-bits", "0"], "--quantize-bits 0 must be between 2 and 16", tmp_path / "b")  # fmt: skip


# 13. a fresh run never adopts an earlier run's best weights
def test_fresh_run_ignores_stale_best_weights(tmp_path, tokenizer, corpus_file):
    from offsite.training.checkpoint import BEST
    from offsite.training.data import load_data, split_validation
    from offsite.training.finetune import freeze_except_adapter
    from offsite.training.loop import train

    bundle = package_emulator(
        tiny_model("llama"),
        tokenizer,
        make_plan(DEPTH, emulator_layers=2),
        tmp_path / "b",
        base_name="t",
    )
    cfg = TrainConfig(max_steps=2, batch_size=2, learning_rate=1e-2, eval_every=1, save_every=0)
    train_data, val_data = split_validation(load_data(corpus_file, tokenizer, 16), 0.2, 42)
    ckpt = tmp_path / "ckpt"

    def run():
        model = bundle.load_model()
        freeze_except_adapter(model, bundle)
        return train(
            model, train_data, cfg, pad_id=0, val_data=val_data, checkpoint_dir=ckpt, keep_best=True
        )

    run()
    best = json.loads((ckpt / BEST / "best.json").read_text())
    (ckpt / BEST / "best.json").write_text(json.dumps({**best, "val_perplexity": 0.0, "step": 10}))
    summary = run()  # a fresh run (no --resume): the stale, unbeatable record must not win
    assert summary["best_val_perplexity"] > 0 and summary["best_step"] in (1, 2)


# 15. compression and FLOPs see GPT-2's Conv1D weights
def test_compression_and_flops_on_conv1d():
    from offsite.emulator.compress import prune_magnitude, quantize_weights
    from offsite.models.flops import block_costs

    model = tiny_model("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_magnitude(model, [3], 0.5)
    quantize_weights(model, [4], 4)
    changed = {
        k.split(".")[2] for k, v in model.state_dict().items() if not torch.equal(v, before[k])
    }
    assert changed == {"3", "4"}
    assert block_costs(model.config, 16)[0] > 0


def test_unwritable_out_is_found_before_training(flow, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    expect_error(
        capsys, data_owner, _finetune(flow, tmp_path / "afile" / "out"), "is not a directory"
    )
