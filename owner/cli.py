"""`owner`: set up a home, enroll data owners, package and serve bundles, verify and merge adapters."""

from __future__ import annotations

import argparse
from pathlib import Path

from offsite.evaluation.specs import builtin_tasks
from offsite.models.loading import DEFAULT_MODEL
from offsite.recipes.evaluate import EvaluateSpec
from offsite_cli.args import add_dtype, add_eval, add_peft
from offsite_cli.runner import make_parser, run, subparsers
from owner.commands import (
    cmd_adapters,
    cmd_cleanup,
    cmd_enroll,
    cmd_evaluate,
    cmd_evaluate_offsite,
    cmd_federate,
    cmd_init,
    cmd_merge,
    cmd_revoke,
    cmd_sample_corpus,
    cmd_serve,
)
from owner.package_cli import add_package


def _add_exchange(sub) -> None:
    p = sub.add_parser(
        "init", help="create an owner home: CA, server certificate, signing key, registry"
    )
    p.add_argument("--home", required=True)
    p.add_argument(
        "--server-name",
        action="append",
        default=[],
        help="extra host name or IP for the server certificate",
    )
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("enroll", help="issue credentials to a data owner")
    p.add_argument("--home", required=True)
    p.add_argument(
        "--name", required=True, help="the data owner's identity (letters, digits, - _ .)"
    )
    p.add_argument(
        "--out", required=True, help="credentials file to write (deliver it out of band)"
    )
    p.set_defaults(func=cmd_enroll)
    p = sub.add_parser("revoke", help="stop accepting a data owner's certificate")
    p.add_argument("--home", required=True)
    p.add_argument("--name", required=True)
    p.set_defaults(func=cmd_revoke)
    p = sub.add_parser("serve", help="serve bundles and receive adapters over gRPC with mutual TLS")
    p.add_argument("--home", required=True)
    p.add_argument(
        "--listen", default="127.0.0.1:50051", help="host:port (port 0 picks a free one)"
    )
    p.add_argument(
        "--insecure-dev",
        action="store_true",
        help="NO TLS, trust claimed identities: local testing only",
    )
    p.add_argument("--chunk-bytes", type=int, default=1 << 20, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("cleanup", help="remove stale uploads (the server also does it as it runs)")
    p.add_argument("--home", required=True)
    p.set_defaults(func=cmd_cleanup)
    p = sub.add_parser("adapters", help="adapters received: from whom, verified or rejected, why")
    p.add_argument("--home", required=True)
    p.set_defaults(func=cmd_adapters)


def _add_federate(sub) -> None:
    p = sub.add_parser(
        "federate",
        help="FedAvg rounds over several enrolled data owners (run beside `owner serve`)",
    )
    p.add_argument("--home", required=True)
    p.add_argument(
        "--name", required=True, help="the federation's name (run again with it to resume)"
    )
    p.add_argument(
        "--bundle", required=True, help="the packaged emulator bundle every round starts from"
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="the full model the bundle was made from")
    p.add_argument("--members", type=lambda t: tuple(x for x in t.split(",") if x), required=True,
                   help="enrolled data owners, comma-separated")  # fmt: skip
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument(
        "--quorum",
        type=int,
        default=0,
        help="close a round once this many adapters arrived (default: all)",
    )
    p.add_argument("--deadline", type=float, default=3600.0,
                   help="close a round after this many seconds with whatever arrived (default 3600)")  # fmt: skip
    p.add_argument("--max-weight-ratio", type=float, default=4.0,
                   help="no member's adapter weighs more than this times the smallest token count received "
                   "in its round (signed counts are claims the owner cannot check; default 4)")  # fmt: skip
    p.add_argument(
        "--poll", type=float, default=5.0, help="seconds between looks at the registry (default 5)"
    )
    p.add_argument(
        "--once", action="store_true", help="advance once and report, instead of running to the end"
    )
    p.set_defaults(func=cmd_federate)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "owner", "Model owner: package emulators, serve them, verify and merge returned adapters."
    )
    sub = subparsers(parser)
    _add_exchange(sub)
    _add_federate(sub)
    add_package(sub)
    _add_merge(sub)
    _add_evaluate_offsite(sub)
    _add_sample_corpus(sub)
    p = sub.add_parser("evaluate", help="perplexity of a model on held-out data, JSON on stdout")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="any --model spec, e.g. a merged directory"
    )
    add_eval(p)
    add_dtype(p)
    p.set_defaults(func=cmd_evaluate)
    return parser


def _add_merge(sub) -> None:
    p = sub.add_parser(
        "merge-adapter", help="verify a returned adapter and plug it into the full model"
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"the full model the bundle was made from (default: the registry's, else {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--adapter",
        required=True,
        help="adapter directory, or with --home an adapter id from `owner adapters`",
    )
    p.add_argument("--home", default=None, help="owner home whose registry holds the adapter")
    p.add_argument(
        "--bundle",
        default=None,
        help="the bundle the adapter was trained from (required without --home; its adapter blocks fix the key set)",
    )
    p.add_argument(
        "--signer-key",
        default=None,
        help="without --home: the data owner's public signing key (PEM) to check the adapter's signature with",
    )
    p.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="merge without checking a signature (for adapters made without credentials); the record says so",
    )
    p.add_argument("--allow-revoked", action="store_true",
                   help="with --home: merge an adapter whose signer has been revoked (refused otherwise); the record says so")  # fmt: skip
    p.add_argument("--out", required=True, help="merged Hugging Face model directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    add_dtype(p)
    p.set_defaults(func=cmd_merge)


def _add_evaluate_offsite(sub) -> None:
    p = sub.add_parser(
        "evaluate-offsite",
        help="the five settings per task: OUT/summary.md, OUT/TASK/result.{md,json,png}",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="the full model the bundle was made from")
    p.add_argument("--bundle", required=True, help="the emulator bundle to evaluate")
    p.add_argument("--task", action="append", default=[], metavar="TASK",
                   help=f"built-in task ({', '.join(builtin_tasks())}), a spec .yaml, or lm-eval:NAME; repeatable")  # fmt: skip
    p.add_argument("--data-root", default=None,
                   help="folder the task specs' files are relative to (default $OFFSITE_DATA or ../shared/data)")  # fmt: skip
    p.add_argument("--train", default=None, help="instead of --task: training text (.txt)")
    p.add_argument("--test", default=None, help="instead of --task: held-out text (.txt)")
    d = EvaluateSpec(bundle=Path(), out=Path())
    p.add_argument("--steps", type=int, default=d.train.max_steps,
                   help=f"fine-tuning steps, the same for emulator and full model (default {d.train.max_steps})")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=d.train.batch_size)
    p.add_argument("--learning-rate", type=float, default=d.train.learning_rate,
                   help=f"the adapter's peak learning rate (default {d.train.learning_rate})")  # fmt: skip
    p.add_argument("--full-learning-rate", type=float, default=d.full_learning_rate,
                   help=f"full-model fine-tuning's learning rate (default {d.full_learning_rate})")  # fmt: skip
    p.add_argument("--warmup-steps", type=int, default=d.train.warmup_steps)
    p.add_argument("--seed", type=int, default=42, help="training order and the split of spec files without a test file")  # fmt: skip
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens per sequence (default 128 for perplexity tasks, 256 for choice tasks)")  # fmt: skip
    p.add_argument("--eval-limit", "--max-sequences", type=int, default=None,
                   help="score only the first N test items (held-out blocks for perplexity tasks)")  # fmt: skip
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training items")  # fmt: skip
    p.add_argument(
        "--no-full-finetune",
        action="store_true",
        help="skip the costly full-model fine-tuning ceiling",
    )
    p.add_argument("--out", required=True, help="directory for the results")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--format", choices=("json", "md"), default="json",
                   help="stdout: the results as JSON (default) or the summary table as Markdown")  # fmt: skip
    add_dtype(p)
    add_peft(p)
    p.set_defaults(func=cmd_evaluate_offsite)


def _add_sample_corpus(sub) -> None:
    p = sub.add_parser(
        "sample-corpus",
        help="write a public corpus sampled from the full model (for --selection-data/--distill-data)",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="the full model to sample from")
    p.add_argument("--out", required=True, help="text file to write (documents separated by blank lines)")  # fmt: skip
    p.add_argument("--documents", type=int, default=256, help="documents to sample (default 256)")  # fmt: skip
    p.add_argument("--tokens", type=int, default=256, help="tokens per document (default 256)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=32, help="documents sampled together (default 32)")  # fmt: skip
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (default 50; 0: all)")  # fmt: skip
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_dtype(p)
    p.set_defaults(func=cmd_sample_corpus)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
