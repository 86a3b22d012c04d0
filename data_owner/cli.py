"""`data-owner`: fetch a bundle, fine-tune its adapter on local data, submit it, evaluate."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from offsite.artefacts.adapter import open_adapter, plug_into_emulator
from offsite.artefacts.bundle import Bundle, check_bundle_model, open_bundle
from offsite.artefacts.signing import Signer, load_private
from offsite.errors import OffsiteError
from offsite.exchange.credentials import Credentials, load_credentials
from offsite.training.finetune import FinetuneJob, finetune_bundle, round_schedule
from offsite_cli.args import add_dp, add_eval, add_peft, add_training, peft_options, train_config
from offsite_cli.progress import TrainingBar, perplexity_with_bar
from offsite_cli.runner import make_parser, print_json, run, subparsers


@contextlib.contextmanager
def _owner(args: argparse.Namespace) -> Iterator:
    """A connected client for --server (imports grpc only when a server is used)."""
    from offsite.transport.client import RetryPolicy, connect

    creds = load_credentials(args.credentials) if args.credentials else None
    retry = RetryPolicy(attempts=args.retries)
    with connect(
        args.server, creds, insecure_identity=args.insecure_dev_identity, retry=retry
    ) as owner:
        yield owner


def _bytes_bar(desc: str) -> tqdm:
    return tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True)


def _fetch(owner, bundle_id: str | None, out: Path) -> Bundle:
    from offsite.transport.client import fetch

    bar = None

    def start(total: int) -> None:  # the bar appears only once there is something to download
        nonlocal bar
        bar = _bytes_bar("downloading")
        bar.total = total

    try:
        return fetch(owner, bundle_id, out, on_bytes=lambda n: bar.update(n), on_total=start)
    finally:
        if bar is not None:
            bar.close()


def _verified_bundle(path: Path, credentials: Credentials | None) -> Bundle:
    """Open a bundle directory: hashes always; with credentials also the owner's signature and issued_to."""
    bundle = open_bundle(path)
    if credentials is not None:
        credentials.check_bundle(bundle)
    return bundle


def cmd_fetch(args: argparse.Namespace) -> None:
    with _owner(args) as owner:
        bundle = _fetch(owner, args.bundle_id, Path(args.out))
    print_json({"bundle": str(bundle.path), "bundle_id": bundle.bundle_id, "verified": True})


def cmd_submit(args: argparse.Namespace) -> None:
    from offsite.transport.client import submit

    with _owner(args) as owner:
        bar = _bytes_bar("uploading")
        try:
            result = submit(owner, Path(args.adapter), on_bytes=bar.update)
        finally:
            bar.close()
    print_json(result)


def finetune_job(args: argparse.Namespace, out: Path, checkpoint_dir: Path | None) -> FinetuneJob:
    """The FinetuneJob the training options describe, for `finetune` and each round of `join`."""
    return FinetuneJob(
        data=Path(args.data), out=out, block_size=args.block_size, val_fraction=args.val_fraction,
        checkpoint_dir=checkpoint_dir, resume=args.resume, overwrite=getattr(args, "overwrite", True),
        keep_checkpoints=args.keep_checkpoints, peft=peft_options(args) if hasattr(args, "peft") else None,
        low_memory=args.low_memory,
    )  # fmt: skip


def cmd_finetune(args: argparse.Namespace) -> None:
    cfg = train_config(args)
    if (args.bundle is None) == (args.server is None):
        raise OffsiteError("give exactly one of --bundle DIR or --server ADDR")
    if args.server and not (args.credentials or args.insecure_dev_identity):
        raise OffsiteError("--server needs --credentials")
    out = Path(args.out)
    job = finetune_job(args, out, Path(args.checkpoint_dir) if args.checkpoint_dir else None)
    creds = load_credentials(args.credentials) if args.credentials else None
    signer = (
        Signer(creds.name, load_private(creds.signing_key.encode(), args.credentials))
        if creds
        else None
    )
    if args.server:
        bundle_dir = (
            Path(args.bundle_dir) if args.bundle_dir else out.with_name(out.name + ".bundle")
        )
        if bundle_dir.exists():  # a previous download: checked like a fresh one
            bundle = _verified_bundle(bundle_dir, creds)
        else:
            with _owner(args) as owner:
                bundle = _fetch(owner, args.bundle_id, bundle_dir)
    else:
        bundle = _verified_bundle(Path(args.bundle), creds)
    bar = TrainingBar()
    try:
        adapter = finetune_bundle(bundle, job, cfg, on_step=bar, signer=signer)
    finally:
        bar.close()
    if adapter is None:
        return  # not the main process
    t = adapter.manifest["training"]
    result = {"adapter": str(adapter.path), "bundle_id": bundle.bundle_id, "steps": t["steps"],
              "final_loss": t["final_loss"], "val_perplexity": t["val_perplexity"],
              "differential_privacy": t.get("differential_privacy")}  # fmt: skip
    if args.server:
        from offsite.transport.client import submit

        with _owner(args) as owner:
            result["submitted"] = submit(owner, adapter.path)
    print_json(result)


def cmd_join(args: argparse.Namespace) -> None:
    """Federated rounds: fetch each round's bundle, fine-tune, submit, until --rounds are done."""
    from offsite.transport.join import join

    cfg = train_config(args)
    if not args.credentials:
        raise OffsiteError(
            "join needs --credentials (the adapters it submits are signed with them)"
        )
    creds = load_credentials(args.credentials)
    signer = Signer(creds.name, load_private(creds.signing_key.encode(), args.credentials))

    def train(bundle: Bundle, out: Path) -> Path:
        creds.check_bundle(bundle)  # signed by the owner we enrolled with, issued to us
        round_cfg = round_schedule(cfg, bundle) if args.round_schedule == "continue" else cfg
        # a round's adapter folder never exists when it trains (join skips a trained round), so no
        # --overwrite; --checkpoint-dir holds one folder per round, --resume continues one
        ckpt = Path(args.checkpoint_dir) / out.name if args.checkpoint_dir else None
        job = finetune_job(args, out, ckpt)
        bar = TrainingBar(f"round {out.name}")
        try:
            return finetune_bundle(bundle, job, round_cfg, on_step=bar, signer=signer).path
        finally:
            bar.close()

    with _owner(args) as owner:
        done = join(owner, args.rounds, Path(args.work), train, poll_s=args.poll, wait_s=args.wait)
    print_json(done)


def cmd_evaluate(args: argparse.Namespace) -> None:
    creds = load_credentials(args.credentials) if args.credentials else None
    bundle = _verified_bundle(Path(args.bundle), creds)
    model = bundle.load_model(dtype=torch.float32)
    check_bundle_model(bundle, model)
    if args.adapter:
        plug_into_emulator(model, bundle, open_adapter(args.adapter))
    result = perplexity_with_bar(model, bundle.load_tokenizer(), args)
    print_json({"bundle": str(bundle.path), "adapter": args.adapter, **result})


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
