"""Prototype behind docs/results/selection-transfer-scores.jsonl: the owner-side transfer score of
plain-drop emulators with other choices of the 13 kept middle blocks (SmolLM2, 2+2 adapter).
Run from the repository root: OMP_NUM_THREADS=1 PYTHONPATH=. python docs/results/selection-scores-prototype.py
Kept as the record of how those rows were measured; not part of the library.
"""

import json
from dataclasses import replace

import torch

from offsite.emulator.build import build_emulator
from offsite.emulator.plan import SplitPlan
from offsite.emulator.recipe import PUBLIC_SAMPLE
from offsite.emulator.transfer import transfer_score
from offsite.models.loading import load_model, load_tokenizer
from offsite.training.data import load_data, pad_id_of

full, tok = load_model("smollm2-135m", torch.float32), load_tokenizer("smollm2-135m")
full.requires_grad_(False)
sample = load_data(PUBLIC_SAMPLE, tok, 128)
sample = replace(sample, examples=sample.examples[64:80])
adapter = (0, 1, 28, 29)
red = (4, 5, 8, 10, 11, 18, 19, 20, 21, 22, 23, 24, 27)
cands = {
    "redundancy": red,
    "bottom-contig": tuple(range(2, 15)),
    "top-contig": tuple(range(15, 28)),
    "keep2,3+red": tuple(sorted({2, 3} | set(red[:-2]))),
    "uniform": (2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 27),
    "first4+top": tuple(sorted({2, 3, 4, 5} | set(range(19, 28)))),
    "red-no27+26": (4, 5, 8, 10, 11, 18, 19, 20, 21, 22, 23, 24, 26),
}
for name, kept in cands.items():
    plan = SplitPlan(30, adapter, tuple(sorted(kept)), "explicit")
    emu = build_emulator(full, plan)
    s = transfer_score(full, emu, plan, sample, pad_id=pad_id_of(tok))
    print(json.dumps({"sel": name, "kept": list(plan.kept), "score": s}), flush=True)
