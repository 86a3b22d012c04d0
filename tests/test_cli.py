"""The CLIs end to end on a tiny model directory, and every bad input: one line, exit code 2."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import copy_tree as _copy
from helpers import expect_error as _expect_error
from helpers import rewrite_adapter as _rewrite_adapter
from safetensors.torch import load_file
from tiny import save_tiny

from data_owner.cli import main as data_owner
from offsite.artefacts.adapter import ADAPTER_MANIFEST, WEIGHTS_NAME
from offsite.atomic import sha256_file
from owner.cli import main as owner


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """model dir -> bundle -> adapter, made once through the CLIs."""
    root = tmp_path_factory.mktemp("flow")
    save_tiny("llama", root / "model")
    save_tiny("llama", root / "other", seed=1)
    from tiny import CORPUS

    (root / "corpus.txt").write_text(CORPUS)
    assert (
        owner(
            [
                "package-emulator",
                "--model",
                str(root / "model"),
                "--out",
                str(root / "bundle"),
                "--emulator-layers",
                "2",
            ]
        )
        == 0
    )
    assert (
        owner(
            [
                "package-emulator",
                "--model",
                str(root / "model"),
                "--out",
                str(root / "bundle3"),
                "--emulator-layers",
                "3",
            ]
        )
        == 0
    )
    args = ["finetune", "--bundle", str(root / "bundle"), "--data", str(root / "corpus.txt"), "--out", str(root / "adapter"),
            "--max-steps", "3", "--block-size", "16", "--batch-size", "2", "--learning-rate", "1e-2"]  # fmt: skip
    assert data_owner(args) == 0
    return root


def test_merge_and_evaluate_happy_path(flow, capsys):
    capsys.readouterr()
    assert owner(["merge-adapter", "--model", str(flow / "model"), "--adapter", str(flow / "adapter"),
                  "--bundle", str(flow / "bundle"), "--allow-unsigned", "--out", str(flow / "merged")]) == 0  # fmt: skip
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(flow / "merged")
    AutoTokenizer.from_pretrained(flow / "merged")
    trained = load_file(str(flow / "adapter" / WEIGHTS_NAME))
    state = merged.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())
    capsys.readouterr()
    for fn, argv in [
        (owner, ["evaluate", "--model", str(flow / "merged"), "--data", str(flow / "corpus.txt"), "--block-size", "32"]),
        (data_owner, ["evaluate", "--bundle", str(flow / "bundle"), "--data", str(flow / "corpus.txt"), "--block-size", "32"]),
        (data_owner, ["evaluate", "--bundle", str(flow / "bundle"), "--adapter", str(flow / "adapter"),
                      "--data", str(flow / "corpus.txt"), "--block-size", "32"]),
    ]:  # fmt: skip
        assert fn(argv) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["perplexity"] > 1 and result["tokens"] > 0


def test_console_scripts_exit_2_without_traceback(flow, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "owner.cli", "package-emulator", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "b")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "nope: not a model directory" in proc.stderr


def test_unknown_model_and_architecture(flow, tmp_path, capsys):
    _expect_error(capsys, owner, ["package-emulator", "--model", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "b")],
                  "missing.gguf: GGUF file not found", tmp_path / "b")  # fmt: skip
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    _expect_error(capsys, owner, ["package-emulator", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "b")],
                  "model_type 'mamba' is not supported; supported: bloom", tmp_path / "b")  # fmt: skip
    _expect_error(capsys, owner, ["package-emulator", "--model", "no-such-org/no-such-model", "--out", str(tmp_path / "b")],
                  "cannot load model 'no-such-org/no-such-model'", tmp_path / "b")  # fmt: skip


def test_invalid_split(flow, tmp_path, capsys):
    _expect_error(capsys, owner, ["package-emulator", "--model", str(flow / "model"), "--out", str(tmp_path / "b"),
                                  "--emulator-layers", "9"], "--emulator-layers 9 is not possible", tmp_path / "b")  # fmt: skip


def test_existing_output_is_not_clobbered(flow, capsys):
    before = sha256_file(flow / "bundle" / "model.safetensors")
    _expect_error(capsys, owner, ["package-emulator", "--model", str(flow / "model"), "--out", str(flow / "bundle")],
                  "directory exists and is not empty")  # fmt: skip
    assert sha256_file(flow / "bundle" / "model.safetensors") == before


def _first(tensors):
    return sorted(tensors)[0]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda t: t.__setitem__(_first(t), torch.full_like(t[_first(t)], float("nan"))),
            "contains NaN or Inf",
        ),
        (lambda t: t.__setitem__(_first(t), torch.zeros(3, 3)), "has shape [3, 3]"),
        (
            lambda t: t.__setitem__(_first(t), t[_first(t)].half()),
            "has dtype float16, expected float32",
        ),
        (lambda t: t.pop(_first(t)), "missing tensors"),
        (
            lambda t: t.__setitem__("model.layers.3.mlp.up_proj.weight", torch.zeros(64, 32)),
            "unexpected tensors model.layers.3",
        ),
    ],
)
def test_tampered_adapters_are_rejected(flow, tmp_path, capsys, mutate, message):
    bad = _copy(flow / "adapter", tmp_path / "bad")
    _rewrite_adapter(bad, mutate)
    _expect_error(capsys, owner, ["merge-adapter", "--model", str(flow / "model"), "--adapter", str(bad), "--bundle", str(flow / "bundle"), "--allow-unsigned",
                                  "--out", str(tmp_path / "m")], message, tmp_path / "m")  # fmt: skip


def test_corrupted_files_are_rejected(flow, tmp_path, capsys):
    bad = _copy(flow / "adapter", tmp_path / "bad")
    (bad / WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json header}")
    _expect_error(capsys, owner, ["merge-adapter", "--model", str(flow / "model"), "--adapter", str(bad), "--bundle", str(flow / "bundle"), "--allow-unsigned", "--out", str(tmp_path / "m")],
                  "adapter.safetensors: sha256 does not match the manifest", tmp_path / "m")  # fmt: skip
    manifest = json.loads((bad / ADAPTER_MANIFEST).read_text())
    manifest["files"][WEIGHTS_NAME] = sha256_file(bad / WEIGHTS_NAME)
    (bad / ADAPTER_MANIFEST).write_text(json.dumps(manifest))
    _expect_error(capsys, owner, ["merge-adapter", "--model", str(flow / "model"), "--adapter", str(bad), "--bundle", str(flow / "bundle"), "--allow-unsigned", "--out", str(tmp_path / "m")],
                  "not a valid safetensors file", tmp_path / "m")  # fmt: skip
    (bad / ADAPTER_MANIFEST).write_text("{broken")
    _expect_error(capsys, owner, ["merge-adapter", "--model", str(flow / "model"), "--adapter", str(bad), "--bundle", str(flow / "bundle"), "--allow-unsigned", "--out", str(tmp_path / "m")],
                  "adapter_manifest.json: not valid JSON", tmp_path / "m")  # fmt: skip
    bundle = _copy(flow / "bundle", tmp_path / "bundle")
    (bundle / "model.safetensors").write_bytes(b"garbage")
    _expect_error(capsys, data_owner, ["finetune", "--bundle", str(bundle), "--data", str(flow / "corpus.txt"), "--out", str(tmp_path / "a")],
                  "model.safetensors: sha256 does not match the manifest", tmp_path / "a")  # fmt: skip


def test_adapter_from_another_model_or_bundle(flow, tmp_path, capsys):
    _expect_error(capsys, owner, ["merge-adapter", "--model", str(flow / "other"), "--adapter", str(flow / "adapter"),
                                  "--bundle", str(flow / "bundle"), "--allow-unsigned", "--out", str(tmp_path / "m")],
                  "was made for base model", tmp_path / "m")  # fmt: skip
    _expect_error(capsys, owner, ["merge-adapter", "--model", str(flow / "model"), "--adapter", str(flow / "adapter"),
                                  "--bundle", str(flow / "bundle3"), "--allow-unsigned", "--out", str(tmp_path / "m")],
                  "adapter was trained from bundle", tmp_path / "m")  # fmt: skip
    _expect_error(capsys, data_owner, ["evaluate", "--bundle", str(flow / "bundle3"), "--adapter", str(flow / "adapter"),
                                       "--data", str(flow / "corpus.txt")], "was not trained from bundle")  # fmt: skip


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "", "empty.txt: data file is empty"),
        ("short.txt", "to be or not", "shorter than one block of 512"),
        ("bad.jsonl", '{"text": "a"}\n{"text": "b"\n', "bad.jsonl:2: not valid JSON"),
    ],
)
def test_bad_training_data(flow, tmp_path, capsys, name, content, message):
    (tmp_path / name).write_text(content)
    _expect_error(capsys, data_owner, ["finetune", "--bundle", str(flow / "bundle"), "--data", str(tmp_path / name),
                                       "--out", str(tmp_path / "a")], message, tmp_path / "a")  # fmt: skip
    assert not (tmp_path / "a.ckpt").exists()


def test_usage_errors_are_one_line_exit_2(capsys):
    _expect_error(capsys, data_owner, ["finetune", "--bundle", "b", "--data", "d", "--out", "a", "--batch-size", "x"],
                  "invalid int value")  # fmt: skip
    _expect_error(
        capsys,
        owner,
        ["package-emulator", "--out", "b", "--adapter-blocks", "0,a"],
        "not a comma-separated list",
    )


def test_evaluate_offsite_writes_the_five_settings(flow, tmp_path, capsys):
    args = ["evaluate-offsite", "--bundle", str(flow / "bundle"), "--train", str(flow / "corpus.txt"),
            "--test", str(flow / "corpus.txt"), "--steps", "2", "--block-size", "16", "--max-sequences", "4"]  # fmt: skip
    capsys.readouterr()
    assert owner([*args, "--model", str(flow / "model"), "--out", str(tmp_path / "r"), "--full-learning-rate", "1e-3"]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)  # stdout is JSON, as for every command
    assert printed["results"][0]["task"] == "corpus"
    result = json.loads((tmp_path / "r" / "corpus" / "result.json").read_text())
    from offsite.training.finetune import ADAPTER_LEARNING_RATE

    assert (result["learning_rate"], result["full_learning_rate"]) == (ADAPTER_LEARNING_RATE, 1e-3)
    assert {
        "full_zero_shot",
        "emulator_zero_shot",
        "emulator_finetuned",
        "plug_in",
        "full_finetuned",
        "gap_closed",
    } <= set(result)
    assert (
        "| plug-in (full model + adapter) |"
        in (tmp_path / "r" / "corpus" / "result.md").read_text()
    )
    assert (tmp_path / "r" / "corpus" / "result.png").is_file()
    assert "| corpus | perplexity |" in (tmp_path / "r" / "summary.md").read_text()
    _expect_error(capsys, owner, [*args, "--model", str(flow / "other"), "--out", str(tmp_path / "r2")],
                  "bundle was not made from --model", tmp_path / "r2")  # fmt: skip


@pytest.mark.parametrize("peft", [[], ["--peft", "lora"], ["--peft", "ia3"], ["--peft", "ln"]])
def test_low_memory_finetune_returns_the_same_adapter(flow, tmp_path, monkeypatch, peft):
    """--low-memory sets the allocator (recorded here: it is process-wide) and, in float32 with
    checkpointing, holds a bf16 bundle's frozen weights in bf16: the adapter is bit-identical."""
    calls = []
    monkeypatch.setattr("offsite.training.finetune.limit_heap_growth", lambda: calls.append(1))
    bundle = tmp_path / "bundle"
    assert owner(["package-emulator", "--model", str(flow / "model"), "--out", str(bundle),
                  "--emulator-layers", "2", "--dtype", "bfloat16"]) == 0  # fmt: skip
    adapters = {}
    for flag in ([], ["--low-memory"]):
        out = tmp_path / f"adapter{len(flag)}"
        assert data_owner(["finetune", "--bundle", str(bundle), "--data", str(flow / "corpus.txt"), "--out", str(out),
                           "--max-steps", "3", "--block-size", "16", "--batch-size", "2", "--learning-rate", "1e-2",
                           "--gradient-checkpointing", *peft, *flag]) == 0  # fmt: skip
        files = sorted(out.glob("*.safetensors"))
        assert files
        adapters[bool(flag)] = {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}
    assert calls == [1]
    assert adapters[True].keys() == adapters[False].keys()
    assert all(torch.equal(adapters[True][k], adapters[False][k]) for k in adapters[False])
