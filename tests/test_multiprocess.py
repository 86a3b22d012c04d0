"""`torchrun --nproc_per_node 2` gives the fine-tune two processes over gloo on CPU."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import CORPUS, DEPTH, tiny_model

from offsite.emulator.package import package_emulator
from offsite.emulator.plan import make_plan

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which(
    "torchrun"
)


@pytest.mark.multiprocess
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
def test_finetune_runs_on_two_cpu_processes(tmp_path, tokenizer):
    package_emulator(
        tiny_model("llama"),
        tokenizer,
        make_plan(DEPTH, emulator_layers=2),
        tmp_path / "b",
        base_name="t",
    )
    (tmp_path / "d.txt").write_text(CORPUS)
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "data_owner.cli", "finetune",
           "--bundle", str(tmp_path / "b"), "--data", str(tmp_path / "d.txt"), "--out", str(tmp_path / "a"),
           "--max-steps", "4", "--block-size", "16", "--batch-size", "2", "--save-every", "2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parents[1]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    training = json.loads((tmp_path / "a" / "adapter_manifest.json").read_text())["training"]
    assert training["processes"] == 2 and training["steps"] == 4
    assert training["tokens_this_run"] == 4 * 2 * 2 * 16, "each step saw both processes' batches"
