"""Emulator zero-shot perplexity by selection strategy (and distillation) on a real model.

    python -m scripts.emulator_quality --kept 13 17 20 23 \\
        --public ../shared/data/wikitext-2/valid.txt --heldout ../shared/data/wikitext-2/test.txt
    python -m scripts.emulator_quality --kept 13 --strategies redundancy --distill-steps 150 ...

Selection statistics and distillation use the owner's public corpus (--public); perplexity is
measured on separate held-out text. Prints a Markdown table and writes JSON rows to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from offsite.emulator.plan import make_plan
from offsite.emulator.recipe import EmulatorRecipe, make_emulator
from offsite.emulator.selection import RULES
from offsite.evaluation.perplexity import perplexity
from offsite.models.architectures import num_blocks
from offsite.models.loading import load_model, load_tokenizer
from offsite.training.config import TrainConfig
from offsite.training.data import TokenData, load_data, pad_id_of


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument(
        "--public",
        required=True,
        help="owner's public corpus: selection statistics and distillation",
    )
    p.add_argument("--heldout", required=True, help="held-out text for perplexity")
    p.add_argument("--kept", type=int, nargs="+", default=[13])
    p.add_argument("--strategies", nargs="+", default=list(RULES), choices=RULES)
    p.add_argument("--distill-steps", type=int, default=0)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--eval-sequences", type=int, default=32)
    p.add_argument("--checkpoint-dir", default=None, help="distillation checkpoints (resumable)")
    p.add_argument("--out", default="runs/emulator_quality.jsonl")
    a = p.parse_args()

    full = load_model(a.model, torch.float32)  # as the README's tables
    tok = load_tokenizer(a.model)
    held = load_data(a.heldout, tok, a.block_size)
    held = TokenData(held.examples[: a.eval_sequences], held.source, held.sha256, held.mode)
    base = perplexity(full, held, pad_id=pad_id_of(tok))["perplexity"]
    rows = []
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    for k in a.kept:
        for strategy in a.strategies:
            t = time.perf_counter()
            distill = TrainConfig(max_steps=max(a.distill_steps, 1), learning_rate=1e-4, warmup_steps=10,
                                  eval_every=25, save_every=25)  # fmt: skip
            ck = Path(a.checkpoint_dir) / f"{strategy}-{k}" if a.checkpoint_dir else None
            recipe = EmulatorRecipe(selection=strategy, selection_data=Path(a.public), block_size=a.block_size,
                                    distill_data=Path(a.public) if a.distill_steps else None, distill=distill,
                                    checkpoint_dir=ck, resume=bool(ck and ck.exists()))  # fmt: skip
            emulator, plan, record = make_emulator(
                full, tok, make_plan(num_blocks(full.config), emulator_layers=k), recipe
            )
            ppl = perplexity(emulator, held, pad_id=pad_id_of(tok))["perplexity"]
            row = {"kept": k, "strategy": strategy, "distill_steps": a.distill_steps, "kept_blocks": list(plan.kept),
                   "full_ppl": base, "emulator_ppl": ppl, "ratio": ppl / base, "seconds": round(time.perf_counter() - t)}  # fmt: skip
            rows.append(row)
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(
        f"\nfull model zero-shot: {base:.2f}\n\n| kept | strategy | distill steps | emulator zero-shot | x full |\n|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['kept']} | {r['strategy']} | {r['distill_steps']} | {r['emulator_ppl']:.1f} | {r['ratio']:.2f} |"
        )


if __name__ == "__main__":
    main()
