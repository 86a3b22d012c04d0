"""Privacy-utility report: the five settings against emulator size (with/without distillation).

    python -m scripts.privacy_utility --kept 13 20 23 --steps 40 \\
        --train data/samples/shakespeare-train.txt --test data/samples/shakespeare-test.txt \\
        [--selection redundancy] [--distill-data PUBLIC.txt --distill-steps 150] --out runs/privacy_utility

Writes OUT/report.md (a table), OUT/report.json and OUT/report.png (perplexity of emulator
zero-shot, emulator fine-tuned and plug-in against the number of kept blocks, with the full
model's zero-shot and fine-tuned levels as lines), so the owner can pick an emulator size.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from offsite.emulator.layerwise import LayerwiseConfig
from offsite.emulator.plan import make_plan
from offsite.emulator.recipe import EmulatorRecipe, make_emulator
from offsite.emulator.selection import RULES
from offsite.evaluation.five_settings import evaluate_offsite
from offsite.evaluation.tasks import PerplexityTask
from offsite.models.architectures import num_blocks
from offsite.models.loading import load_model, load_tokenizer
from offsite.training.config import TrainConfig


def plot(rows: list[dict], path: Path) -> None:
    """Perplexity (log scale) of the emulator settings against kept blocks, per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    settings = (("emulator_zero_shot", ":", "#e57373"), ("emulator_finetuned", "--", "#fb8c00"), ("plug_in", "-", "#43a047"))  # fmt: skip
    for recipe, marker in zip(sorted({r["recipe"] for r in rows}), itertools.cycle("os^vDPX*")):
        rs = sorted((r for r in rows if r["recipe"] == recipe), key=lambda r: r["kept"])
        for key, style, colour in settings:
            ax.plot([r["kept"] for r in rs], [r[key] for r in rs], style, marker=marker, color=colour,
                    label=f"{key.replace('_', ' ')} ({recipe})")  # fmt: skip
    ax.axhline(rows[0]["full_zero_shot"], color="grey", label="full model zero-shot")
    if rows[0].get("full_finetuned"):
        ax.axhline(rows[0]["full_finetuned"], color="black", label="full-model fine-tuning")
    ax.set_yscale("log")
    ax.set_xlabel("middle blocks kept in the emulator")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: list[dict]) -> str:
    head = "| kept | recipe | emulator zero-shot | emulator fine-tuned | plug-in | full zero-shot | full fine-tuned | gap closed | privacy margin |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        ft = f"{r['full_finetuned']:.2f}" if r.get("full_finetuned") else "-"
        gap = f"{100 * r['gap_closed']:.0f}%" if r.get("gap_closed") is not None else "-"
        lines.append(f"| {r['kept']} | {r['recipe']} | {r['emulator_zero_shot']:.2f} | {r['emulator_finetuned']:.2f} | "
                     f"{r['plug_in']:.2f} | {r['full_zero_shot']:.2f} | {ft} | {gap} | {r['privacy_margin']:.2f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--kept", type=int, nargs="+", default=[13, 20, 23])
    p.add_argument("--selection", default="redundancy", choices=RULES)
    p.add_argument(
        "--selection-data",
        default=None,
        help="sample text for redundancy/similarity (default --train)",
    )
    p.add_argument(
        "--distill-data", default=None, help="also sweep distilled emulators on this public corpus"
    )
    p.add_argument("--distill-steps", type=int, default=150)
    p.add_argument("--layerwise-steps", type=int, default=0, help="also sweep layer-wise distilled emulators (steps per block)")  # fmt: skip
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=2e-4, help="the adapter's peak learning rate")  # fmt: skip
    p.add_argument("--full-learning-rate", type=float, default=None,
                   help="full-model fine-tuning's learning rate (default: --learning-rate)")  # fmt: skip
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--eval-sequences", type=int, default=None)
    p.add_argument("--no-full-finetune", action="store_true")
    p.add_argument("--out", default="runs/privacy_utility")
    a = p.parse_args()

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    full, tok = (
        load_model(a.model, torch.float32),
        load_tokenizer(a.model),
    )  # as the README's tables
    task = PerplexityTask.from_files(Path(a.train), Path(a.test), a.block_size, a.eval_sequences)
    cfg = TrainConfig(
        max_steps=a.steps,
        batch_size=a.batch_size,
        learning_rate=a.learning_rate,
        warmup_steps=2,
        save_every=0,
    )
    distill = TrainConfig(
        max_steps=a.distill_steps, learning_rate=1e-4, warmup_steps=10, eval_every=25
    )
    recipes = [("no distillation", {"layerwise": None})]
    if a.layerwise_steps:
        recipes.append(("layer-wise", {"layerwise": LayerwiseConfig(steps=a.layerwise_steps)}))
    if a.distill_data:
        recipes.append(("distilled", {"distill_data": Path(a.distill_data), "distill": distill}))
    rows, full_ft = [], {}
    for k in a.kept:
        for name, options in recipes:
            recipe = EmulatorRecipe(
                selection=a.selection, selection_data=Path(a.selection_data or a.train), **options
            )
            emulator, plan, info = make_emulator(
                full, tok, make_plan(num_blocks(full.config), emulator_layers=k), recipe
            )
            # same task, same batches: the full model's zero-shot score and ceiling are measured once
            r = evaluate_offsite(full, tok, plan, emulator, task, cfg, full_finetune=not a.no_full_finetune,
                                 full_learning_rate=a.full_learning_rate, measured=full_ft,
                                 on_phase=lambda s, k=k: print(f"[kept {k}] {s}", flush=True))  # fmt: skip
            full_ft = {k: r[k] for k in ("full_zero_shot", "full_finetuned") if r[k] is not None}
            rows.append(
                {"kept": k, "recipe": name, "selection": a.selection, "emulator": info, **r}
            )
            (out / "report.json").write_text(json.dumps(rows, indent=2))
    (out / "report.md").write_text(table(rows))
    plot(rows, out / "report.png")
    print(table(rows))


if __name__ == "__main__":
    main()
