"""The `data-owner` commands: each turns parsed arguments into one recipe call and prints its result."""

from __future__ import annotations

import argparse
from pathlib import Path

from offsite.recipes.fetch import fetch_bundle
from offsite.recipes.finetune import FinetuneSpec, finetune
from offsite.recipes.join import JoinSpec, join_rounds
from offsite.recipes.perplexity import emulator_perplexity
from offsite.recipes.remote import Remote
from offsite.recipes.submit import submit_adapter
from offsite.training.finetune import FinetuneJob
from offsite_cli.args import held_out, optional_path, peft_options, train_config
from offsite_cli.progress import TransferBars, counting_bar, training_bar
from offsite_cli.runner import print_json


def _remote(args: argparse.Namespace) -> Remote | None:
    if args.server is None:
        return None
    return Remote(args.server, retries=args.retries, insecure_identity=args.insecure_dev_identity)


def finetune_job(args: argparse.Namespace, out: Path, overwrite: bool) -> FinetuneJob:
    """The FinetuneJob the training options describe, for `finetune` and `join` (whose rounds
    each train into their own folder under --work)."""
    return FinetuneJob(
        data=Path(args.data), out=out, block_size=args.block_size,
        val_fraction=args.val_fraction, checkpoint_dir=optional_path(args.checkpoint_dir), resume=args.resume,
        overwrite=overwrite, keep_checkpoints=args.keep_checkpoints,
        peft=peft_options(args) if hasattr(args, "peft") else None, low_memory=args.low_memory,
    )  # fmt: skip


def cmd_finetune(args: argparse.Namespace) -> None:
    spec = FinetuneSpec(job=finetune_job(args, Path(args.out), args.overwrite), train=train_config(args),
                        bundle=optional_path(args.bundle), remote=_remote(args),
                        credentials=optional_path(args.credentials), bundle_id=args.bundle_id,
                        bundle_dir=optional_path(args.bundle_dir))  # fmt: skip
    transfer = TransferBars("downloading")
    try:
        with training_bar() as bar:
            result = finetune(
                spec, on_step=bar, on_bytes=transfer.on_bytes, on_total=transfer.on_total
            )
    finally:
        transfer.close()
    if result is not None:  # None: not the main process
        print_json(result)


def cmd_join(args: argparse.Namespace) -> None:
    """Federated rounds: fetch each round's bundle, fine-tune, submit, until --rounds are done."""
    spec = JoinSpec(remote=_remote(args), credentials=optional_path(args.credentials), rounds=args.rounds,
                    work=Path(args.work), job=finetune_job(args, Path(args.work), overwrite=False), train=train_config(args),
                    round_schedule=args.round_schedule, poll_s=args.poll, wait_s=args.wait)  # fmt: skip
    with training_bar("round") as bar:

        def on_round(k: int, n: int) -> None:
            bar.desc = f"round {k}/{n}"

        print_json(join_rounds(spec, on_step=bar, on_round=on_round))


def cmd_fetch(args: argparse.Namespace) -> None:
    transfer = TransferBars("downloading")
    try:
        bundle = fetch_bundle(_remote(args), optional_path(args.credentials), Path(args.out), args.bundle_id,
                              on_bytes=transfer.on_bytes, on_total=transfer.on_total)  # fmt: skip
    finally:
        transfer.close()
    print_json({"bundle": str(bundle.path), "bundle_id": bundle.bundle_id, "verified": True})


def cmd_submit(args: argparse.Namespace) -> None:
    transfer = TransferBars("uploading")
    try:
        result = submit_adapter(_remote(args), optional_path(args.credentials), Path(args.adapter),
                                on_bytes=transfer.on_bytes)  # fmt: skip
    finally:
        transfer.close()
    print_json(result)


def cmd_evaluate(args: argparse.Namespace) -> None:
    ho = held_out(args)
    advance, close = counting_bar(ho.max_sequences, "evaluating")
    try:
        result = emulator_perplexity(ho, Path(args.bundle), optional_path(args.adapter),
                                     optional_path(args.credentials), on_batch=advance)  # fmt: skip
    finally:
        close()
    print_json(result)
