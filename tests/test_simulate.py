"""The two-party simulation demo end to end on a tiny model: real processes, gRPC, mutual TLS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]


def test_simulation_runs_the_whole_exchange(tmp_path, corpus_file):
    save_tiny("llama", tmp_path / "model")
    work = tmp_path / "work"
    argv = [sys.executable, "-m", "scripts.simulate", "--model", str(tmp_path / "model"), "--train", str(corpus_file),
            "--test", str(corpus_file), "--emulator-layers", "2", "--selection", "redundancy",
            "--selection-data", str(corpus_file), "--steps", "2", "--block-size", "16", "--eval-limit", "4",
            "--workdir", str(work)]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for n in range(1, 9):
        assert f"[{n}/8]" in done.stdout
    assert "| plug-in (full model + adapter) |" in done.stdout
    r = json.loads((work / "results" / "corpus" / "result.json").read_text())
    assert all(r[k] > 1 for k in ("full_zero_shot", "emulator_zero_shot", "emulator_finetuned", "plug_in", "full_finetuned"))  # fmt: skip
    assert len(r["curves"]["emulator_finetune"]) == 2 and len(r["curves"]["full_finetune"]) == 2
    assert (work / "results" / "corpus" / "result.png").is_file()
    assert (work / "model-owner" / "merged" / "config.json").is_file()
    received = list((work / "model-owner" / "home" / "adapters").glob("*/adapter_manifest.json"))
    assert len(received) == 1, "the adapter arrived in the owner's home over gRPC"
    assert not any((work / "model-owner" / "home" / "uploads").iterdir()), "no staging copy left"


def test_simulation_refuses_bad_input_before_starting(tmp_path):
    done = subprocess.run([sys.executable, "-m", "scripts.simulate", "--train", str(tmp_path / "none.txt"),
                           "--workdir", str(tmp_path / "w")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.returncode == 2 and "none.txt: data file not found" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "w").exists()


def test_federated_simulation_runs_rounds_over_the_exchange(tmp_path, corpus_file):
    save_tiny("llama", tmp_path / "model")
    work = tmp_path / "work"
    argv = [sys.executable, "-m", "scripts.simulate", "--model", str(tmp_path / "model"), "--train", str(corpus_file),
            "--holdout", "0.3", "--emulator-layers", "2", "--selection", "uniform", "--layerwise-steps", "0",
            "--steps", "2", "--block-size", "16", "--eval-limit", "4", "--data-owners", "3", "--rounds", "2",
            "--workdir", str(work)]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((work / "results" / "federated.json").read_text())
    settings = [r["setting"] for r in result["rows"]]
    assert settings[:3] == [
        "full model zero-shot",
        "federated, after round 1",
        "federated, after round 2",
    ]
    assert settings[-2:] == ["pooled data", "pooled data, the federation's total steps"]
    assert len(settings) == 8 and "gain_vs_pooled_same_total_steps" in result
    for name in ("alice", "bob", "carol"):
        done_rounds = json.loads((work / name / "rounds" / "join.json").read_text())
        assert [d["status"] for d in done_rounds] == ["verified", "verified"]


def test_each_data_owner_gives_its_share_of_the_held_out_text():
    from scripts.federated import held_out_per_owner

    text = " ".join(f"w{i}" for i in range(3000))
    train, test = held_out_per_owner(text, 3, 0.1)
    assert len(train) == 3 and all(part.strip() for part in train)
    pieces = test.split("\n")
    assert len(pieces) == 3 and all(0.05 < len(p) / len(text) * 3 < 0.15 for p in pieces)
    # each owner's piece is the tail of its part
    for part, piece in zip(train, pieces, strict=True):
        assert (part + piece).strip() in text
    assert not set(" ".join(train).split()) & set(test.split()), "nothing held out is trained on"
