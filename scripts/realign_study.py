"""Does re-aligning the emulator between rounds (FedBiOT) make the adapter transfer better?

    python -m scripts.realign_study [--model smollm2-135m] [--steps 40] [--rounds 2]

The adapter is trained through the default emulator in ROUNDS rounds of STEPS/ROUNDS steps (a fresh
optimizer each round, as a data owner joining a new round starts one). Between rounds, one arm
keeps the emulator; the other re-fits it layer-wise to the full model *with the current adapter
plugged in* (the alignment step of FedBiOT, Wu et al. 2024: the emulator is made to imitate the
full model around the adapter the data owners are converging to), and the next round trains on
that. Prints one JSON line per round and arm: the plug-in's held-out perplexity and the share of
the zero-shot-to-full-fine-tuning gap it closes (the ceiling measured here, on the same batches).
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from offsite.artefacts.adapter import plug_adapter
from offsite.emulator.layerwise import LayerwiseConfig, distill_layerwise
from offsite.emulator.package import package_emulator
from offsite.emulator.plan import make_plan
from offsite.emulator.recipe import PUBLIC_SAMPLE, EmulatorRecipe, make_emulator
from offsite.evaluation.five_settings import FULL_LEARNING_RATE, Scoreboard
from offsite.evaluation.tasks import PerplexityTask
from offsite.models.architectures import num_blocks
from offsite.models.loading import load_model, load_tokenizer
from offsite.training.config import TrainConfig
from offsite.training.data import load_data, pad_id_of
from offsite.training.finetune import ADAPTER_LEARNING_RATE, make_trainable, trained_adapter
from offsite.training.loop import train

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=40, help="adapter steps in all")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    full, tok = load_model(a.model, torch.float32), load_tokenizer(a.model)
    full.requires_grad_(False)
    task = PerplexityTask.from_files(SAMPLES / "shakespeare-train.txt", SAMPLES / "shakespeare-test.txt", 128, 48)  # fmt: skip
    data, pad = task.train_data(tok), pad_id_of(tok)
    cfg = TrainConfig(max_steps=a.steps // a.rounds, batch_size=4, learning_rate=ADAPTER_LEARNING_RATE,
                      warmup_steps=2, save_every=0)  # fmt: skip
    board = Scoreboard(task, tok)
    board.score("full_zero_shot", full)
    board.full_finetune(
        full, data, replace(cfg, max_steps=a.steps, learning_rate=FULL_LEARNING_RATE)
    )
    zero, ceiling = board.r["full_zero_shot"], board.r["full_finetuned"]
    plan = make_plan(num_blocks(full.config))
    emulator, plan, _ = make_emulator(full, tok, plan, EmulatorRecipe())
    sample = load_data(PUBLIC_SAMPLE, tok, EmulatorRecipe().block_size)
    with tempfile.TemporaryDirectory() as tmp:

        def student_of(emu, name):
            bundle = package_emulator(
                full, tok, plan, Path(tmp) / name, base_name=a.model, emulator=emu
            )
            return make_trainable(bundle.load_model(dtype=torch.float32), bundle, None)[0], bundle

        arms = {arm: student_of(emulator, arm) for arm in ("kept", "realigned")}
        for r in range(a.rounds):
            for arm, (student, bundle) in list(arms.items()):
                train(student, data, replace(cfg, seed=42 + r), pad_id=pad)
                plugged = copy.deepcopy(full)
                plug_adapter(plugged, trained_adapter(student, bundle, None)[0])
                value = task.score(plugged, tok)["value"]
                row = {"round": r + 1, "arm": arm, "plug_in": round(value, 3),
                       "gap_closed": round((value - zero) / (ceiling - zero), 3),
                       "emulator_finetuned": round(task.score(student, tok)["value"], 3)}  # fmt: skip
                if (
                    arm == "realigned" and r + 1 < a.rounds
                ):  # re-fit around the adapter, carry it over
                    t0 = time.perf_counter()
                    fitted, _ = distill_layerwise(plugged, plan, sample, LayerwiseConfig())
                    arms[arm] = student_of(fitted, f"{arm}-{r + 1}")
                    row["realign_seconds"] = round(time.perf_counter() - t0)
                print(json.dumps(row), flush=True)
    print(json.dumps({"full_zero_shot": zero, "full_finetuned": ceiling}))


if __name__ == "__main__":
    main()
