"""Prototype behind docs/results/partial-fit-shakespeare.jsonl: layer-wise fitting of only some kept
blocks (the others left as dropped), scored by transfer score and, with an argument, the five
settings (Shakespeare sample, 40 steps of 4x128 at lr 1e-3; ceiling 28.917 and zero-shot 62.013
taken from the transfer study). Run from the repository root:
    OMP_NUM_THREADS=1 PYTHONPATH=. python docs/results/partial-fit-prototype.py full
Kept as the record of how those rows were measured; not part of the library.
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

import offsite.emulator.layerwise as lw
from offsite.emulator.plan import make_plan
from offsite.emulator.recipe import PUBLIC_SAMPLE
from offsite.emulator.selection import block_stats, select_plan
from offsite.emulator.transfer import transfer_score
from offsite.evaluation.five_settings import evaluate_offsite
from offsite.evaluation.tasks import PerplexityTask
from offsite.models.loading import load_model, load_tokenizer
from offsite.training.data import load_data, pad_id_of
from offsite.training.loop import TrainConfig

full, tok = load_model("smollm2-135m", torch.float32), load_tokenizer("smollm2-135m")
full.requires_grad_(False)
fit_sample = load_data(PUBLIC_SAMPLE, tok, 256)
score_sample = load_data(PUBLIC_SAMPLE, tok, 128)
score_sample = replace(score_sample, examples=score_sample.examples[64:80])
plan = select_plan(make_plan(30), "redundancy", block_stats(full, fit_sample))
print("kept", plan.kept, flush=True)
orig = lw.fit_block
variants = {
    "upper(>=11)": lambda k: k >= 11,
    "lower(<11)": lambda k: k < 11,
    "upper(>=18)": lambda k: k >= 18,
}
S = Path("data/samples")
task = PerplexityTask.from_files(S / "shakespeare-train.txt", S / "shakespeare-test.txt", 128, 48)
cfg = TrainConfig(max_steps=40, batch_size=4, learning_rate=1e-3, warmup_steps=2, save_every=0)
for name, allow in variants.items():
    blocks = []

    def patched(block, *a, blocks=blocks, allow=allow, **k):
        # which kept block is this? the emulator order index is not passed; use a counter
        idx = plan.kept[len(blocks)]
        blocks.append(idx)
        if allow(idx):
            return orig(block, *a, **k)
        return (0.0, 0.0)

    lw.fit_block = patched
    emu, rec = lw.distill_layerwise(full, plan, fit_sample, lw.LayerwiseConfig())
    lw.fit_block = orig
    s = transfer_score(full, emu, plan, score_sample, pad_id=pad_id_of(tok))
    print(json.dumps({"variant": name, "score": s}), flush=True)
    if len(sys.argv) > 1:
        r = evaluate_offsite(full, tok, plan, emu, task, cfg, full_finetune=False)
        zs, ft = 62.013, 28.917
        print(
            json.dumps(
                {
                    "variant": name,
                    "emu_zs": r["emulator_zero_shot"],
                    "emu_ft": r["emulator_finetuned"],
                    "plug": r["plug_in"],
                    "gap": (r["plug_in"] - zs) / (ft - zs),
                    "margin": r["emulator_finetuned"] / r["plug_in"],
                }
            ),
            flush=True,
        )
