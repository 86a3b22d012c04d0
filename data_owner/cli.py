"""`data-owner`: the parser of each command (fetch, fine-tune, submit, join, evaluate)."""

from __future__ import annotations

import argparse

from data_owner.commands import cmd_evaluate, cmd_fetch, cmd_finetune, cmd_join, cmd_submit
from offsite_cli.args import add_dp, add_eval, add_peft, add_training
from offsite_cli.runner import make_parser, run, subparsers


def _add_server(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--server", required=required, default=None, help="the model owner's address, host:port"
    )
    p.add_argument("--credentials", default=None, help="credentials file from `owner enroll`")
    p.add_argument(
        "--retries",
        type=int,
        default=12,
        help="attempts per call before giving up, with backoff (default 12)",
    )
    p.add_argument("--insecure-dev-identity", default=None, help=argparse.SUPPRESS)


def _add_join(sub) -> None:
    p = sub.add_parser(
        "join", help="take part in the owner's federated rounds (fetch, fine-tune, submit, repeat)"
    )
    _add_server(p, required=True)
    p.add_argument("--rounds", type=int, required=True, help="how many rounds to take part in")
    p.add_argument("--data", required=True, help="your local training data (.txt or .jsonl)")
    p.add_argument(
        "--work", required=True, help="folder for each round's bundle and adapter (and progress)"
    )
    p.add_argument(
        "--poll",
        type=float,
        default=10.0,
        help="seconds between looks for the next bundle (default 10)",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=3600.0,
        help="give up after this long without a new bundle (default 3600)",
    )
    p.add_argument(
        "--round-schedule",
        choices=("continue", "restart"),
        default="continue",
        help="continue: one run spread over the federation's rounds (its learning-rate schedule "
        "and batch order go on from round to round); restart: each round its own full schedule "
        "from the first batches (default continue)",
    )
    add_training(p, overwrite=False)
    add_dp(p)
    p.set_defaults(func=cmd_join)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "data-owner", "Data owner: fine-tune an emulator bundle's adapter on private data."
    )
    sub = subparsers(parser)

    p = sub.add_parser(
        "finetune", help="train the adapter on local data (bundle from a directory or the server)"
    )
    p.add_argument("--bundle", default=None, help="emulator bundle directory (or use --server)")
    _add_server(p, required=False)
    p.add_argument(
        "--bundle-id", default=None, help="with --server: which issued bundle (default: the newest)"
    )
    p.add_argument(
        "--bundle-dir",
        default=None,
        help="with --server: where the bundle is downloaded (default OUT.bundle)",
    )
    p.add_argument(
        "--data",
        required=True,
        help=".txt (packed language modelling) or .jsonl ({text} or {prompt, completion})",
    )
    p.add_argument("--out", required=True, help="adapter directory to create")
    add_training(p)
    add_peft(p)
    add_dp(p)
    p.set_defaults(func=cmd_finetune)

    _add_join(sub)

    p = sub.add_parser("fetch", help="download a bundle issued to you (resumable) and verify it")
    _add_server(p, required=True)
    p.add_argument("--bundle-id", default=None, help="which issued bundle (default: the newest)")
    p.add_argument("--out", required=True, help="bundle directory to create")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("submit", help="upload a signed adapter to the model owner (resumable)")
    _add_server(p, required=True)
    p.add_argument("--adapter", required=True, help="adapter directory")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "evaluate", help="perplexity of the emulator (optionally with an adapter), JSON on stdout"
    )
    p.add_argument("--bundle", required=True, help="emulator bundle directory")
    p.add_argument(
        "--credentials", default=None, help="also verify the owner's signature on the bundle"
    )
    p.add_argument("--adapter", default=None, help="adapter directory trained from this bundle")
    add_eval(p)
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
