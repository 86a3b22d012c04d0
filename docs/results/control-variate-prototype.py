"""Prototype (not a library option): subtract from the data owner's adapter update what the same
recipe learns through the emulator on the owner's generic text, as a control variate for the part
of the update that repairs the emulator. Measured on the default half-depth bundle (float32):

    data-owner finetune --bundle B --data data/samples/shakespeare-train.txt --out task/ \
        --max-steps 40 --block-size 128 --batch-size 4 --learning-rate 1e-3 --warmup-steps 2 \
        --val-fraction 0 --save-every 0
    data-owner finetune --bundle B --data ../shared/data/wikitext-2/valid.txt --out generic/ \
        (the same options)
    python docs/results/control-variate-prototype.py task/ generic/ 0,0.5,1

plug-in = full model with adapter blocks base + (task - base) - lambda * (generic - base), scored on
48 held-out blocks of 128 tokens of the Shakespeare sample (rows: control-variate-shakespeare.jsonl).
"""

import json
import sys

import torch
from safetensors.torch import load_file

from offsite.artefacts.adapter import plug_adapter
from offsite.evaluation.perplexity import perplexity_on_file
from offsite.models.loading import load_model, load_tokenizer

full = load_model("smollm2-135m", torch.float32)
tok = load_tokenizer("smollm2-135m")
task = load_file(sys.argv[1] + "/adapter.safetensors")
generic = load_file(sys.argv[2] + "/adapter.safetensors")
params = dict(full.named_parameters())
base = {k: params[k].detach().clone() for k in task}
for lam in [float(x) for x in sys.argv[3].split(",")]:
    plug_adapter(full, {k: task[k].float() - lam * (generic[k].float() - base[k]) for k in task})
    r = perplexity_on_file(full, tok, "data/samples/shakespeare-test.txt", block_size=128, max_sequences=48)  # fmt: skip
    print(json.dumps({"lambda": lam, "plug_in": r["perplexity"]}), flush=True)
plug_adapter(full, base)
