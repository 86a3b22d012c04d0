"""`data-owner`: fine-tune a bundle's adapter on local data, evaluate the emulator."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer

from offsite.adapter import open_adapter, plug_into_emulator
from offsite.bundle import check_bundle_model, open_bundle
from offsite.evaluation import perplexity_on_file
from offsite.finetune import FinetuneJob, finetune_bundle
from offsite_cli.args import add_eval, add_training, train_config
from offsite_cli.progress import TrainingBar, counting_bar
from offsite_cli.runner import make_parser, print_json, run, subparsers


def cmd_finetune(args: argparse.Namespace) -> None:
    cfg = train_config(args)
    bundle = open_bundle(args.bundle)
    job = FinetuneJob(
        data=Path(args.data), out=Path(args.out), block_size=args.block_size, val_fraction=args.val_fraction,
        checkpoint_dir=Path(args.checkpoint_dir) if args.checkpoint_dir else None, resume=args.resume,
        overwrite=args.overwrite, keep_checkpoints=args.keep_checkpoints,
    )  # fmt: skip
    bar = TrainingBar()
    try:
        adapter = finetune_bundle(bundle, job, cfg, on_step=bar)
    finally:
        bar.close()
    if adapter is not None:
        t = adapter.manifest["training"]
        print_json({"adapter": str(adapter.path), "bundle_id": bundle.bundle_id, "steps": t["steps"],
                    "final_loss": t["final_loss"], "val_perplexity": t["val_perplexity"]})  # fmt: skip


def cmd_evaluate(args: argparse.Namespace) -> None:
    bundle = open_bundle(args.bundle)
    model = bundle.load_model(dtype=torch.float32)
    check_bundle_model(bundle, model)
    if args.adapter:
        plug_into_emulator(model, bundle, open_adapter(args.adapter))
    advance, close = counting_bar(args.max_sequences or 0, "evaluating")
    try:
        result = perplexity_on_file(
            model, AutoTokenizer.from_pretrained(bundle.path), args.data, block_size=args.block_size,
            batch_size=args.batch_size, max_sequences=args.max_sequences, on_batch=advance,
        )  # fmt: skip
    finally:
        close()
    print_json({"bundle": str(bundle.path), "adapter": args.adapter, **result})


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "data-owner", "Data owner: fine-tune an emulator bundle's adapter on private data."
    )
    sub = subparsers(parser)

    p = sub.add_parser("finetune", help="train the adapter on local data and write it")
    p.add_argument("--bundle", required=True, help="emulator bundle directory from the model owner")
    p.add_argument(
        "--data",
        required=True,
        help=".txt (packed language modelling) or .jsonl ({text} or {prompt, completion})",
    )
    p.add_argument("--out", required=True, help="adapter directory to create")
    add_training(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "evaluate", help="perplexity of the emulator (optionally with an adapter), JSON on stdout"
    )
    p.add_argument("--bundle", required=True, help="emulator bundle directory")
    p.add_argument("--adapter", default=None, help="adapter directory trained from this bundle")
    add_eval(p)
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
