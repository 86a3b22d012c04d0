"""Two-party simulation: the model owner and the data owner as separate processes over gRPC + mTLS.

    python -m scripts.simulate                      # SmolLM2-135M, the shipped Shakespeare sample
    python -m scripts.simulate --task sst2 --data-root ../shared/data --steps 60
    python -m scripts.simulate --model DIR --train a.txt --test b.txt --emulator-layers 8

The model owner sets up its CA, enrols the data owner, packages a signed emulator bundle for it
and serves it (`owner serve`, a long-lived process on loopback). The data owner, with nothing but
its credentials file, downloads and verifies the bundle, fine-tunes the adapter on its private
data and uploads it. The model owner verifies the returned adapter and merges it. Every step is
the real CLI in its own OS process. Finally a referee (this process) measures the five settings
of the paper on the held-out data and writes OUT/summary.md and OUT/TASK/result.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from offsite.emulator.recipe import PUBLIC_SAMPLE
from offsite.emulator.selection import RULES
from offsite.evaluation.five_settings import FULL_LEARNING_RATE
from offsite.training.finetune import ADAPTER_LEARNING_RATE
from scripts.processes import Phase, cli, fail, start_server

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


def _training_file(task, work: Path) -> Path:
    """The data owner's private training data as a file its CLI reads (.txt or prompt/completion)."""
    from offsite.evaluation.specs import completion_pairs
    from offsite.evaluation.tasks import PerplexityTask

    path = (
        work / "data-owner" / ("train.txt" if isinstance(task, PerplexityTask) else "train.jsonl")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(task, PerplexityTask):
        path.write_text(task.train_text, encoding="utf-8")
    else:
        pairs = completion_pairs(list(task.train_items), task.delimiter)
        path.write_text(
            "".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs)
        )
    return path


def _task(a: argparse.Namespace):
    from offsite.errors import OffsiteError
    from offsite.evaluation.specs import FileRef, TaskSpec, data_root, load_task
    from offsite.evaluation.tasks import build_task, load_task_files

    if a.task:
        return build_task(load_task(a.task), data_root(a.data_root), block_size=a.block_size, eval_limit=a.eval_limit,
                          train_limit=a.train_limit, seed=a.seed)  # fmt: skip
    for path in (a.train, a.test):
        if path is not None and not Path(path).is_file():
            raise OffsiteError(f"{path}: data file not found")
    if a.test is None:  # split the data owner's text: the last --holdout share is held out
        spec = TaskSpec(name=Path(a.train).stem, kind="perplexity", train=FileRef(str(Path(a.train).resolve())),
                        holdout=a.holdout, source=a.train)  # fmt: skip
        return build_task(spec, Path("."), block_size=a.block_size, eval_limit=a.eval_limit or 48)
    return load_task_files(Path(a.train), Path(a.test), a.block_size or 128, a.eval_limit or 48)


def referee(
    a: argparse.Namespace, task, bundle_dir: Path, adapter: Path, merged: Path, full_cfg
) -> dict:
    """The five settings on the task, each model loaded from what the parties produced; `full_cfg`
    trains the full-model ceiling."""
    from offsite.artefacts.adapter import open_adapter, plug_into_emulator
    from offsite.artefacts.bundle import open_bundle
    from offsite.evaluation.five_settings import Scoreboard
    from offsite.models.loading import load_model, load_tokenizer
    from offsite_cli.progress import TrainingBar

    board = Scoreboard(
        task, load_tokenizer(a.model), lambda name: print(f"      {name}", flush=True)
    )
    full, bundle = load_model(a.model), open_bundle(bundle_dir)
    board.score("full_zero_shot", full)
    emulator = bundle.load_model()
    board.score("emulator_zero_shot", emulator)
    returned = open_adapter(adapter)
    plug_into_emulator(emulator, bundle, returned)
    board.score("emulator_finetuned", emulator)
    board.score("plug_in", load_model(str(merged)))  # what the model owner merged
    history = returned.manifest.get("training", {}).get("history") or []
    board.r["curves"]["emulator_finetune"] = [h["loss"] for h in history]
    if not a.no_full_finetune:
        bar = TrainingBar("full fine-tuning")
        try:
            board.full_finetune(full, task.train_data(board.tokenizer), full_cfg, bar)
        finally:
            bar.close()
    return board.result(model=a.model, steps=full_cfg.max_steps, learning_rate=a.learning_rate,
                        full_learning_rate=full_cfg.learning_rate)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="the model owner's full model (any --model spec)")  # fmt: skip
    p.add_argument("--task", default=None, help="a built-in task, a spec .yaml or lm-eval:NAME (instead of --train/--test)")  # fmt: skip
    p.add_argument("--data-root", default=None, help="folder the task spec's files are relative to")
    p.add_argument("--train", default=str(SAMPLES / "shakespeare-train.txt"), help="the data owner's private training text")  # fmt: skip
    p.add_argument("--test", default=None, help="held-out text (default: the shipped sample's, or --holdout of --train)")  # fmt: skip
    p.add_argument("--holdout", type=float, default=0.1, help="with --train and no --test: the share of the text held out")  # fmt: skip
    p.add_argument("--seed", type=int, default=42, help="training order and the split of spec files without a test file")  # fmt: skip
    p.add_argument("--emulator-layers", type=int, default=None, help="middle blocks kept (default: the owner's, half)")  # fmt: skip
    p.add_argument("--adapter-bottom", type=int, default=None, help="adapter blocks at the bottom (default: the owner's)")  # fmt: skip
    p.add_argument("--adapter-top", type=int, default=None, help="adapter blocks at the top (default: the owner's)")  # fmt: skip
    p.add_argument("--selection", default=None, choices=RULES, help="default: the owner's")  # fmt: skip
    p.add_argument("--layerwise-steps", type=int, default=None, help="layer-wise distillation steps per block (default: the owner's)")  # fmt: skip
    p.add_argument("--selection-data", default=None,
                   help="the owner's public sample text for block selection and distillation (default: the built-in WikiText sample)")  # fmt: skip
    p.add_argument("--distill-steps", type=int, default=0, help="distil the emulator on --selection-data first (slow on CPU)")  # fmt: skip
    p.add_argument("--steps", type=int, default=40, help="fine-tuning steps (data owner and full-model ceiling)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=ADAPTER_LEARNING_RATE,
                   help=f"the adapter's peak learning rate (default {ADAPTER_LEARNING_RATE}, the data owner's)")  # fmt: skip
    p.add_argument("--full-learning-rate", type=float, default=FULL_LEARNING_RATE,
                   help=f"the referee's full-model fine-tuning learning rate (default {FULL_LEARNING_RATE})")  # fmt: skip
    p.add_argument("--block-size", type=int, default=None, help="tokens per sequence (default 128 LM, 256 choice)")  # fmt: skip
    p.add_argument("--eval-limit", type=int, default=None, help="test items (choice) or held-out blocks (LM, default 48)")  # fmt: skip
    p.add_argument("--train-limit", type=int, default=None, help="training items to use (choice tasks)")  # fmt: skip
    p.add_argument("--no-full-finetune", action="store_true", help="skip the full-model ceiling")
    p.add_argument("--workdir", default="runs/simulate", help="where both parties keep their files (replaced)")  # fmt: skip
    p.add_argument(
        "--data-owners",
        type=int,
        default=1,
        help="more than 1: federated rounds (scripts/federated.py)",
    )
    p.add_argument(
        "--rounds", type=int, default=3, help="with --data-owners: FedAvg rounds of --steps each"
    )
    p.add_argument(
        "--dp-epsilon",
        type=float,
        default=None,
        help="with --data-owners: each data owner trains under DP",
    )
    p.add_argument(
        "--round-schedule",
        choices=("continue", "restart"),
        default="continue",
        help="with --data-owners: data-owner join's --round-schedule (default continue)",
    )
    a = p.parse_args(argv)
    if a.test is None and a.train == str(SAMPLES / "shakespeare-train.txt"):
        a.test = str(SAMPLES / "shakespeare-test.txt")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    from offsite.errors import OffsiteError
    from offsite.evaluation.five_settings import five_settings_table, write_results
    from offsite.training.config import TrainConfig

    try:
        task = _task(a)
        cfg = TrainConfig(max_steps=a.steps, batch_size=a.batch_size, learning_rate=a.learning_rate,
                          warmup_steps=2, seed=a.seed, save_every=0)  # fmt: skip
    except OffsiteError as e:
        fail(str(e))
    if a.data_owners > 1:
        from scripts.federated import run

        return run(a, task)
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    owner_dir, do_dir = work / "model-owner", work / "data-owner"
    owner_dir.mkdir(parents=True)
    home, creds = owner_dir / "home", do_dir / "credentials.json"
    train_file = _training_file(task, work)
    block = str(a.block_size or (128 if task.metric == "perplexity" else 256))
    Phase.n = 0
    t0 = time.perf_counter()

    with Phase("model owner: create the CA and keys, enrol the data owner 'alice'"):
        cli("owner", "init", "--home", str(home))
        cli("owner", "enroll", "--home", str(home), "--name", "alice", "--out", str(creds))
    with Phase("model owner: package the emulator bundle for alice (select blocks, sign)"):
        pkg = ["package-emulator", "--home", str(home), "--for", "alice", "--model", a.model, "--out", str(owner_dir / "bundle")]  # fmt: skip
        for flag, value in (("--selection", a.selection), ("--adapter-bottom", a.adapter_bottom), ("--adapter-top", a.adapter_top),
                            ("--emulator-layers", a.emulator_layers), ("--layerwise-steps", a.layerwise_steps)):  # fmt: skip
            if value is not None:
                pkg += [flag, str(value)]
        if a.selection_data:
            pkg += ["--selection-data", a.selection_data]
        if a.distill_steps:
            pkg += ["--distill-data", a.selection_data or str(PUBLIC_SAMPLE), "--distill-steps", str(a.distill_steps)]  # fmt: skip
        cli("owner", *pkg)
    with Phase("model owner: serve over gRPC with mutual TLS (separate process)"):
        server, address = start_server(home)
    try:
        remote = ["--server", address, "--credentials", str(creds)]
        with Phase("transfer: alice downloads the bundle and verifies signature and hashes"):
            cli("data-owner", "fetch", *remote, "--out", str(do_dir / "bundle"))
        with Phase(f"data owner: fine-tune the adapter on private data ({a.steps} steps)"):
            cli("data-owner", "finetune", "--bundle", str(do_dir / "bundle"), "--credentials", str(creds),
                "--data", str(train_file), "--out", str(do_dir / "adapter"), "--max-steps", str(a.steps),
                "--batch-size", str(a.batch_size), "--learning-rate", str(a.learning_rate), "--warmup-steps", "2",
                "--block-size", block, "--val-fraction", "0", "--seed", str(a.seed), "--save-every", "0")  # fmt: skip
        with Phase("return: alice uploads the signed adapter; the server verifies it"):
            cli("data-owner", "submit", *remote, "--adapter", str(do_dir / "adapter"))
    finally:
        server.terminate()
        server.wait()
    with Phase("model owner: verify the adapter again and merge it into the full model"):
        received = [r for r in cli("owner", "adapters", "--home", str(home)) if r["status"] == "verified"]  # fmt: skip
        if not received:
            fail("the server holds no verified adapter", 1)
        cli("owner", "merge-adapter", "--home", str(home), "--model", a.model,
            "--adapter", received[-1]["adapter_id"], "--out", str(owner_dir / "merged"))  # fmt: skip
    with Phase(f"evaluation: the five settings on {task.name}"):
        full_cfg = replace(cfg, learning_rate=a.full_learning_rate or cfg.learning_rate)
        r = referee(a, task, do_dir / "bundle", do_dir / "adapter", owner_dir / "merged", full_cfg)
        write_results([r], work / "results")
    print(f"\nFive settings on {task.name} ({task.metric}; {a.steps} steps; {time.perf_counter() - t0:.0f} s in all)")  # fmt: skip
    print(five_settings_table(r))
    print(f"Results: {work / 'results'}/ (summary.md, {task.name}/result.png)")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
