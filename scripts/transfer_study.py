"""Transfer study: which emulator recipe and adapter placement make the plug-in, not the data owner, gain.

    python -m scripts.transfer_study --recipes drop layerwise layerwise-teacher \\
        --task shakespeare --task sst2 --task arc-easy --data-root ../shared/data --out runs/transfer

A recipe is a YAML file (`StudyRecipe`): `adapter_bottom`, `adapter_top`, `emulator_layers` (the
split) and `recipe`, an `EmulatorRecipe` as `owner package-emulator --recipe` reads it. A bare
NAME is a built-in one, scripts/recipes/NAME.yaml (drop, layerwise, layerwise-teacher, harmonizer,
layerwise-1mb, layerwise-1mb-fitted, layerwise-k9); a row is named by the file's stem. Each recipe's emulator is built
once (timed), scored by the owner-side transfer score, then run through the five settings on every
task with the same batches; the full-model ceiling is measured once per task. Writes
OUT/rows.jsonl (one row per recipe and task, appended as they finish), OUT/table.md, and prints
the Spearman rank correlation between the transfer score and the gap closed. `--seeds 0 1 2` runs
every recipe x task once per seed (the batch order of every setting and the task's sample of items).
An arm is a recipe at an adapter learning rate (`--learning-rate`); OUT/summary.md gives each
arm x task's mean and 95% interval of the gap closed and the privacy margin (a floor counts as
kept only when the interval's lower end keeps it), and OUT/compare.md each arm's per-seed
difference from each `--reference` arm with its interval (scripts/study_report.py). The full-model
ceiling of each task and seed is kept in OUT/ceilings.json, so later runs into the same OUT
(another recipe or learning rate) reuse it, and a run into an OUT that has some of its rows
resumes: it skips them (and builds no emulator whose rows are all there). `--from-rows` tables
and plots earlier runs' rows together without building anything.

The realistic budget (README "Utility figures"):

    python -m scripts.transfer_study --recipes layerwise --task tinyshakespeare --task sst2 \
        --task arc-easy --task agnews --data-root ../shared/data --seeds 0 1 2 --steps 200 \
        --block-size 256 --eval-limit 1000 --mixed-precision bf16 --out runs/realistic
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from offsite.emulator.plan import make_plan
from offsite.emulator.recipe import PUBLIC_SAMPLE, EmulatorRecipe, make_emulator
from offsite.emulator.transfer import transfer_score
from offsite.errors import OffsiteError
from offsite.evaluation.five_settings import evaluate_offsite
from offsite.evaluation.specs import data_root, load_task
from offsite.evaluation.tasks import PerplexityTask, build_task
from offsite.models.architectures import num_blocks
from offsite.models.loading import load_model, load_tokenizer
from offsite.settings import load_yaml
from offsite.training.config import PRECISIONS, TrainConfig
from offsite.training.data import load_data, pad_id_of
from offsite.training.finetune import ADAPTER_LEARNING_RATE
from scripts.study_report import lr_text, read_rows, report, table

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


RECIPES = Path(__file__).resolve().parent / "recipes"


@dataclass(frozen=True)
class StudyRecipe:
    """One arm of the study, as a YAML file: the split and how the emulator is made."""

    adapter_bottom: int = 2
    adapter_top: int = 2
    emulator_layers: int | None = None  # middle blocks kept (default half)
    recipe: EmulatorRecipe = field(default_factory=EmulatorRecipe)


def load_recipes(names: list[str]) -> dict[str, StudyRecipe]:
    """Each recipe by its row name: NAME is scripts/recipes/NAME.yaml, a path FILE.yaml its stem."""
    out = {}
    for name in names:
        path = Path(name) if name.endswith(".yaml") else RECIPES / f"{name}.yaml"
        if not path.is_file() and not name.endswith(".yaml"):
            known = ", ".join(sorted(p.stem for p in RECIPES.glob("*.yaml")))
            raise OffsiteError(
                f"recipe {name!r}: no such built-in recipe ({known}); or give a FILE.yaml"
            )
        out[path.stem] = load_yaml(StudyRecipe, path)
    return out


def build(full, tok, arm: StudyRecipe) -> tuple:
    """(emulator, plan, record, seconds) for one recipe."""
    plan = make_plan(num_blocks(full.config), adapter_bottom=arm.adapter_bottom, adapter_top=arm.adapter_top,
                     emulator_layers=arm.emulator_layers)  # fmt: skip
    t0 = time.perf_counter()
    emulator, plan, record = make_emulator(full, tok, plan, arm.recipe)
    return emulator, plan, record, time.perf_counter() - t0


def tasks_for(
    names: list[str],
    root: str | None,
    block_size: int | None,
    eval_limit: int,
    train_limit: int,
    seed: int = 42,
) -> list:
    """The tasks by name; `seed` samples the items of choice tasks (and splits files without a test)."""
    out = []
    for n in names:
        if n == "shakespeare":
            out.append(
                PerplexityTask.from_files(
                    SAMPLES / "shakespeare-train.txt",
                    SAMPLES / "shakespeare-test.txt",
                    block_size or 128,
                    48 * 128 // (block_size or 128),
                )
            )
        else:
            out.append(build_task(load_task(n), data_root(root), block_size=block_size, eval_limit=eval_limit,
                                  train_limit=train_limit, seed=seed))  # fmt: skip
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--recipes", nargs="+", default=["drop", "layerwise"])
    p.add_argument("--task", action="append", default=[])
    p.add_argument("--data-root", default=None)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens per sequence (default 128 for text tasks, 256 for choice tasks)")  # fmt: skip
    p.add_argument(
        "--learning-rate", type=float, default=ADAPTER_LEARNING_RATE, help="the adapter's"
    )
    p.add_argument("--full-learning-rate", type=float, default=2e-4)
    p.add_argument("--mixed-precision", choices=PRECISIONS, default="no")
    p.add_argument("--eval-limit", type=int, default=300)
    p.add_argument("--train-limit", type=int, default=2000)
    p.add_argument("--seed", type=int, default=None, help="one seed (as --seeds SEED)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run each recipe x task once per seed: batch order and item sample (default 42)")  # fmt: skip
    p.add_argument("--reference", nargs="+", default=[f"layerwise lr={lr_text(ADAPTER_LEARNING_RATE)}"], metavar="ARM",
                   help="the arms ('RECIPE lr=RATE') that OUT/compare.md pairs every other arm with, seed by seed")  # fmt: skip
    p.add_argument("--out", default="runs/transfer_study")
    p.add_argument("--from-rows", nargs="+", default=None, metavar="ROWS_JSONL",
                   help="build nothing: table and plot the rows of earlier runs (OUT/table.md, OUT/frontier.png)")  # fmt: skip
    return p


def main() -> None:
    p = _parser()
    a = p.parse_args()
    out = Path(a.out)
    if a.from_rows:
        rows = read_rows(a.from_rows, p.error)  # before anything is written
        out.mkdir(parents=True, exist_ok=True)
        report(rows, out, a.reference)
        return
    seeds = a.seeds or [a.seed if a.seed is not None else TrainConfig.seed]
    try:
        recipes = load_recipes(a.recipes)  # every file checked before the model is loaded
    except OffsiteError as e:
        p.error(str(e))
    out.mkdir(parents=True, exist_ok=True)
    full, tok = (
        load_model(a.model, torch.float32),
        load_tokenizer(a.model),
    )  # as the README's tables
    full.requires_grad_(False)
    sample = load_data(PUBLIC_SAMPLE, tok, 128)
    sample = replace(
        sample, examples=sample.examples[64:80]
    )  # not the sequences layer-wise fits on
    ceilings = _Ceilings(out / "ceilings.json")
    seen = _earlier_rows(out)
    done = _done(seen)
    budget = f"steps={a.steps}|bs={a.batch_size}|block={a.block_size}|lr={a.full_learning_rate}|mp={a.mixed_precision}|n={a.eval_limit}"  # fmt: skip
    rows = []
    tasks = a.task or ["shakespeare"]
    for spec, arm in recipes.items():
        todo = [
            (n, s)
            for n in tasks
            for s in seeds
            if (spec, n, s, budget, a.learning_rate) not in done
        ]
        if not todo:
            print(f"[{spec}] every task and seed in {out / 'rows.jsonl'} already", flush=True)
            continue
        emulator, plan, record, seconds = build(full, tok, arm)
        score = transfer_score(full, emulator, plan, sample, pad_id=pad_id_of(tok))
        print(
            f"[{spec}] built in {seconds:.0f}s, kept {list(plan.kept)}, transfer {score}",
            flush=True,
        )
        # task-major, so a run stopped part-way has whole tasks (every seed) rather than one seed of each
        for name, seed in todo:
            (task,) = tasks_for(
                [name], a.data_root, a.block_size, a.eval_limit, a.train_limit, seed
            )
            cfg = TrainConfig(max_steps=a.steps, batch_size=a.batch_size, learning_rate=a.learning_rate, warmup_steps=2,
                              save_every=0, seed=seed, mixed_precision=a.mixed_precision)  # fmt: skip
            key = f"{task.name}|seed={seed}|{budget}"
            known = _measured(seen, (spec, list(plan.kept), score), name, seed, budget)
            if ceilings.get(key) is not None:
                known["full_finetuned"] = ceilings.get(key)
            t0 = time.perf_counter()
            r = evaluate_offsite(full, tok, plan, emulator, task, cfg, full_learning_rate=a.full_learning_rate,
                                 measured=known, on_phase=_phase(f"[{spec}] {name} seed {seed}"))  # fmt: skip
            ceilings.put(key, r["full_finetuned"])
            row = {"recipe": spec, "task_arg": name, "seed": seed, "budget": budget, "build_s": round(seconds, 1),
                   "run_s": round(time.perf_counter() - t0, 1), "batch_size": a.batch_size, "block_size": a.block_size,
                   "mixed_precision": a.mixed_precision, "transfer": score, "kept": list(plan.kept),
                   "adapter": list(plan.adapter), "record": record,
                   **{k: v for k, v in r.items() if k != "curves"}}  # fmt: skip
            rows.append(row)
            seen.append(row)
            with (out / "rows.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(table([row]).splitlines()[-1], flush=True)
    report(_earlier_rows(out) if done else rows, out, a.reference)


def _phase(prefix: str):
    """Prints each phase of a run with the time it starts (where a long run spends its hours)."""
    return lambda name: print(f"{time.strftime('%H:%M:%S')} {prefix}: {name}", flush=True)


def _done(rows: list[dict]) -> set[tuple]:
    """(recipe, task, seed, budget, adapter learning rate) of the rows an earlier run measured:
    a rerun skips them."""
    return {
        (r["recipe"], r["task_arg"], r["seed"], r["budget"], r["learning_rate"])
        for r in rows
        if "budget" in r
    }


def _measured(rows: list[dict], emulator: tuple, task: str, seed: int, budget: str) -> dict:
    """What earlier rows measured that this one cannot change: the full model's zero-shot score on
    the same task, items (seed) and budget, and the emulator's zero-shot score where the same
    `emulator` was built: (recipe, kept blocks, transfer score) equal."""
    out = {}
    for r in rows:
        if (r["task_arg"], r["seed"], r.get("budget")) == (task, seed, budget):
            out["full_zero_shot"] = r["full_zero_shot"]
            if (r["recipe"], r["kept"], r["transfer"]) == emulator:
                out["emulator_zero_shot"] = r["emulator_zero_shot"]
    return out


def _earlier_rows(out: Path) -> list[dict]:
    f = out / "rows.jsonl"
    return (
        [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if f.exists()
        else []
    )


class _Ceilings:
    """Full-model fine-tuning results by (task, seed, budget), kept in a JSON file between runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str) -> float | None:
        return self.data.get(key)

    def put(self, key: str, value: float) -> None:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
