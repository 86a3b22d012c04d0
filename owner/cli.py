"""`owner`: set up a home, enroll data owners, package and serve bundles, verify and merge adapters."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from offsite.artefacts.adapter import open_adapter, plug_adapter, save_merged, verify_adapter
from offsite.artefacts.bundle import open_bundle, package_emulator
from offsite.artefacts.signing import Signer, load_public
from offsite.atomic import atomic_directory, check_output_dir
from offsite.emulator.corpus import SampleConfig, sample_corpus, write_corpus
from offsite.emulator.plan import make_plan
from offsite.emulator.recipe import EmulatorRecipe, make_emulator
from offsite.emulator.selection import RULES
from offsite.errors import OffsiteError
from offsite.evaluation.five_settings import evaluate_offsite, summary_table, write_results
from offsite.evaluation.specs import builtin_tasks, data_root, load_task
from offsite.evaluation.tasks import build_task, load_task_files
from offsite.exchange.home import enroll, init_home, listing, open_home
from offsite.models.architectures import num_blocks
from offsite.models.fingerprint import model_fingerprint
from offsite.models.loading import DEFAULT_MODEL, load_model, load_tokenizer
from offsite.training.loop import TrainConfig
from offsite_cli.args import add_dtype, add_eval, dtype_of, int_list
from offsite_cli.progress import TrainingBar, counting_bar, perplexity_with_bar
from offsite_cli.runner import make_parser, print_json, run, subparsers

MERGE_RECORD = "offsite_merge.json"


def cmd_init(args: argparse.Namespace) -> None:
    home = init_home(args.home, args.server_name)
    print_json(
        {
            "home": str(home.root),
            "ca": str(home.root / "ca.pem"),
            "signing_public_key": str(home.root / "signing.pub"),
        }
    )


def cmd_enroll(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists():
        raise OffsiteError(f"{out}: already exists; choose another --out")
    creds = enroll(open_home(args.home), args.name)
    creds.save(out)
    print_json(
        {
            "data_owner": args.name,
            "credentials": str(out),
            "deliver": "out of band; the file holds private keys",
        }
    )


def cmd_revoke(args: argparse.Namespace) -> None:
    with open_home(args.home).registry() as registry:
        registry.revoke(args.name)
    print_json({"revoked": args.name})


def cmd_package(args: argparse.Namespace) -> None:
    if (args.home is None) != (args.for_ is None):
        raise OffsiteError(
            "--home and --for go together: a signed bundle is issued to one enrolled data owner"
        )
    home = open_home(args.home) if args.home else None
    if home is not None:
        with home.registry() as registry:
            owner = registry.data_owner(args.for_)
        if owner is None or owner.revoked_at:
            raise OffsiteError(
                f"--for {args.for_!r}: no active data owner by that name; enroll it first"
            )
    check_output_dir(args.out, args.overwrite)
    recipe = _recipe(args)
    model = load_model(args.model, dtype=dtype_of(args))
    tokenizer = load_tokenizer(args.model)
    plan = make_plan(
        num_blocks(model.config),
        adapter_bottom=args.adapter_bottom, adapter_top=args.adapter_top, adapter_blocks=args.adapter_blocks,
        emulator_layers=args.emulator_layers, drop_ratio=args.drop_ratio, kept_blocks=args.emulator_blocks,
    )  # fmt: skip
    bar = TrainingBar("distilling")
    try:
        emulator, plan, record = make_emulator(model, tokenizer, plan, recipe, on_step=bar)
    finally:
        bar.close()
    signer = Signer("model-owner", home.signing_key) if home else None
    extra = {"emulator_recipe": record, **({"issued_to": args.for_} if home else {})}
    bundle = package_emulator(model, tokenizer, plan, args.out, base_name=args.model, overwrite=args.overwrite,
                              signer=signer, extra=extra, emulator=emulator)  # fmt: skip
    if home is not None:
        with home.registry() as registry:
            registry.add_bundle(bundle.bundle_id, args.for_, bundle.path.name, str(bundle.path.resolve()), args.model,
                                listing(bundle))  # fmt: skip
    print_json({"bundle": str(bundle.path), "bundle_id": bundle.bundle_id, "issued_to": args.for_,
                "adapter_blocks": list(plan.adapter), "kept_blocks": list(plan.kept), "dropped_blocks": list(plan.dropped)})  # fmt: skip


def _recipe(args: argparse.Namespace) -> EmulatorRecipe:
    distill = TrainConfig(max_steps=args.distill_steps, learning_rate=args.distill_lr, warmup_steps=args.distill_warmup,
                          batch_size=args.distill_batch_size, lr_scheduler="cosine", save_every=args.save_every,
                          eval_every=args.distill_eval_every)  # fmt: skip
    path = lambda value: Path(value) if value else None  # noqa: E731
    return EmulatorRecipe(
        selection="explicit" if args.emulator_blocks else args.selection, selection_data=path(args.selection_data),
        distill_data=path(args.distill_data), distill=distill, distill_weight=args.distill_weight,
        block_size=args.block_size, prune=args.prune, quantize_bits=args.quantize_bits,
        checkpoint_dir=path(args.checkpoint_dir) or (Path(args.out + ".ckpt") if args.distill_data else None),
        resume=args.resume,
    )  # fmt: skip


def _registered_adapter(args: argparse.Namespace) -> tuple[Path, str | None, str | None]:
    """(adapter dir, bundle path, model spec) for --adapter, looked up in --home's registry if given."""
    if args.home is None:
        return Path(args.adapter), args.bundle, args.model
    with open_home(args.home).registry() as registry:
        record = registry.adapter(args.adapter)
        if record is None:
            raise OffsiteError(
                f"--adapter {args.adapter!r}: no such adapter in {args.home}; see `owner adapters`"
            )
        if record["status"] != "verified":
            raise OffsiteError(f"adapter {record['adapter_id']} was rejected: {record['reason']}")
        bundle = registry.bundle(record["bundle_id"])
        key = registry.data_owner(record["data_owner"]).signing_key
    open_adapter(record["path"]).verify_signature(load_public(key.encode(), "registry"))
    return Path(record["path"]), bundle["path"], args.model or bundle["model"]


def cmd_merge(args: argparse.Namespace) -> None:
    check_output_dir(args.out, args.overwrite)
    adapter_dir, bundle_path, model_spec = _registered_adapter(args)
    model_spec = model_spec or DEFAULT_MODEL
    adapter = open_adapter(adapter_dir)
    bundle_id = open_bundle(bundle_path).bundle_id if bundle_path else None
    model = load_model(model_spec, dtype=dtype_of(args))
    fingerprint = model_fingerprint(model)
    state = verify_adapter(adapter, model, fingerprint, bundle_id=bundle_id)
    plug_adapter(model, state)
    out = save_merged(model, load_tokenizer(model_spec), args.out, overwrite=args.overwrite)
    record = {"base_fingerprint": fingerprint, "bundle_id": adapter.manifest["bundle_id"],
              "adapter_blocks": adapter.blocks, "adapter": str(adapter.path), "signer": adapter.manifest.get("signer")}  # fmt: skip
    (out / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    print_json({"merged": str(out), **record})


def cmd_adapters(args: argparse.Namespace) -> None:
    with open_home(args.home).registry() as registry:
        rows = registry.adapters()
    print_json(
        [
            {
                k: r[k]
                for k in (
                    "adapter_id",
                    "data_owner",
                    "bundle_id",
                    "status",
                    "reason",
                    "received_at",
                )
            }
            for r in rows
        ]
    )


def cmd_serve(args: argparse.Namespace) -> None:
    from owner.serve import serve

    serve(
        open_home(args.home), args.listen, insecure=args.insecure_dev, chunk_bytes=args.chunk_bytes
    )


def _tasks(args: argparse.Namespace) -> list:
    if args.task and (args.train or args.test):
        raise OffsiteError(
            "give --task, or --train and --test (a language-modelling task), not both"
        )
    if not args.task:
        if not (args.train and args.test):
            raise OffsiteError(
                "name a task: --task NAME|SPEC.yaml|lm-eval:NAME, or --train and --test files"
            )
        return [
            load_task_files(
                Path(args.train), Path(args.test), args.block_size or 128, args.eval_limit
            )
        ]
    root = data_root(args.data_root)
    return [build_task(load_task(t), root, block_size=args.block_size, eval_limit=args.eval_limit,
                       train_limit=args.train_limit, seed=args.seed) for t in args.task]  # fmt: skip


def cmd_evaluate_offsite(args: argparse.Namespace) -> None:
    out = Path(args.out)
    check_output_dir(out, args.overwrite)
    tasks = _tasks(args)  # specs and data are checked before any model is loaded
    bundle = open_bundle(args.bundle)
    model = load_model(args.model, dtype=dtype_of(args))
    if model_fingerprint(model) != bundle.base_fingerprint:
        raise OffsiteError(f"{args.bundle}: bundle was not made from --model {args.model}")
    tok = load_tokenizer(args.model)
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                      warmup_steps=args.warmup_steps, seed=args.seed, save_every=0)  # fmt: skip
    results = []
    for task in tasks:
        bar = TrainingBar("training")
        try:
            r = evaluate_offsite(model, tok, bundle.plan, bundle.load_model(), task, cfg,
                                 full_finetune=not args.no_full_finetune, on_step=bar,
                                 full_learning_rate=args.full_learning_rate,
                                 on_phase=lambda name, t=task.name: print(f"== [{t}] {name}", file=sys.stderr, flush=True))  # fmt: skip
        finally:
            bar.close()
        results.append({"model": args.model, "bundle": str(bundle.path), **r})
    with atomic_directory(out, overwrite=args.overwrite) as tmp:
        write_results(results, tmp)
    print(summary_table(results), end="")


def cmd_sample_corpus(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.is_dir():
        raise OffsiteError(f"{out}: is a directory; --out takes a file path")
    if out.exists() and not args.overwrite:
        raise OffsiteError(f"{out}: already exists; choose another --out or pass --overwrite")
    if not out.parent.is_dir():
        raise OffsiteError(f"{out.parent}: no such directory for --out")
    cfg = SampleConfig(documents=args.documents, tokens=args.tokens, batch_size=args.batch_size,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)  # fmt: skip
    model = load_model(args.model, dtype=dtype_of(args))
    tokenizer = load_tokenizer(args.model)
    advance, close = counting_bar(cfg.documents, "sampling")
    done = 0

    def on_batch(n: int, total: int) -> None:
        nonlocal done
        advance(n - done)
        done = n

    try:
        docs = sample_corpus(model, tokenizer, cfg, on_batch=on_batch)
    finally:
        close()
    write_corpus(out, docs)
    print_json({"corpus": str(out), "documents": len(docs), "bytes": out.stat().st_size,
                "model": args.model, "seed": cfg.seed})  # fmt: skip


def cmd_evaluate(args: argparse.Namespace) -> None:
    model = load_model(args.model, dtype=dtype_of(args))
    print_json(
        {"model": args.model, **perplexity_with_bar(model, load_tokenizer(args.model), args)}
    )


def _add_package(sub) -> None:
    p = sub.add_parser("package-emulator", help="full model in, emulator bundle out")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub id, HF directory, .gguf file, or {DEFAULT_MODEL} (default)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="bundle directory to create (keep it there: the server serves it from there)",
    )
    p.add_argument(
        "--home", default=None, help="owner home: sign the bundle and register it for --for"
    )
    p.add_argument(
        "--for", dest="for_", default=None, help="the enrolled data owner this bundle is issued to"
    )
    p.add_argument(
        "--adapter-bottom", type=int, default=2, help="bottom blocks in the adapter (default 2)"
    )
    p.add_argument(
        "--adapter-top", type=int, default=2, help="top blocks in the adapter (default 2)"
    )
    p.add_argument(
        "--adapter-blocks",
        type=int_list,
        default=None,
        help="explicit adapter block indices, e.g. 0,1,28,29",
    )
    p.add_argument(
        "--emulator-layers", type=int, default=None, help="middle blocks to keep (default: half)"
    )
    p.add_argument(
        "--drop-ratio",
        type=float,
        default=None,
        help="share of middle blocks to drop instead of --emulator-layers",
    )
    p.add_argument(
        "--emulator-blocks",
        type=int_list,
        default=None,
        help="explicit middle block indices to keep",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    add_dtype(p)
    g = p.add_argument_group("emulator quality")
    g.add_argument("--selection", choices=RULES, default="redundancy",
                   help="which middle blocks to keep: redundancy (default: drop the blocks that change their input least), "
                   "uniform (the paper's rule), similarity (CRaSh-style clusters)")  # fmt: skip
    g.add_argument(
        "--selection-data",
        default=None,
        help="sample text to measure blocks on (default: --distill-data, else a built-in ~110 KB WikiText sample)",
    )
    g.add_argument(
        "--distill-data",
        default=None,
        help="public corpus (.txt/.jsonl): distil the kept blocks on it",
    )
    g.add_argument(
        "--distill-steps", type=int, default=200, help="distillation optimizer steps (default 200)"
    )
    g.add_argument(
        "--distill-lr",
        type=float,
        default=1e-4,
        help="distillation learning rate (default 1e-4, cosine)",
    )
    g.add_argument("--distill-warmup", type=int, default=20, help="warm-up steps (default 20)")
    g.add_argument(
        "--distill-weight",
        type=float,
        default=30.0,
        help="weight w of the hidden-state loss (default 30)",
    )
    g.add_argument(
        "--distill-batch-size", type=int, default=4, help="sequences per step (default 4)"
    )
    g.add_argument(
        "--distill-eval-every",
        type=int,
        default=50,
        help="validate (and keep the best) every N steps",
    )
    g.add_argument(
        "--block-size",
        type=int,
        default=256,
        help="tokens per sequence for selection and distillation",
    )
    g.add_argument(
        "--save-every", type=int, default=50, help="distillation checkpoint every N steps"
    )
    g.add_argument(
        "--checkpoint-dir", default=None, help="distillation checkpoints (default OUT.ckpt)"
    )
    g.add_argument("--resume", action="store_true", help="continue an interrupted distillation")
    g.add_argument(
        "--prune",
        type=float,
        default=0.0,
        help="magnitude-prune this share of emulator block weights",
    )
    g.add_argument(
        "--quantize-bits",
        type=int,
        default=None,
        help="round emulator block weights to N-bit integers",
    )
    p.set_defaults(func=cmd_package)


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
    p = sub.add_parser("adapters", help="adapters received: from whom, verified or rejected, why")
    p.add_argument("--home", required=True)
    p.set_defaults(func=cmd_adapters)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "owner", "Model owner: package emulators, serve them, verify and merge returned adapters."
    )
    sub = subparsers(parser)
    _add_exchange(sub)
    _add_package(sub)

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
        "--bundle", default=None, help="also check the adapter was trained from this bundle"
    )
    p.add_argument("--out", required=True, help="merged Hugging Face model directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    add_dtype(p)
    p.set_defaults(func=cmd_merge)

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
    p.add_argument(
        "--steps",
        type=int,
        default=40,
        help="fine-tuning steps, the same for emulator and full model",
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=2e-4, help="the adapter's peak learning rate (default 2e-4)")  # fmt: skip
    p.add_argument("--full-learning-rate", type=float, default=None,
                   help="full-model fine-tuning's learning rate (default: --learning-rate)")  # fmt: skip
    p.add_argument("--warmup-steps", type=int, default=2)
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
    p.add_argument("--overwrite", action="store_true")
    add_dtype(p)
    p.set_defaults(func=cmd_evaluate_offsite)

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

    p = sub.add_parser("evaluate", help="perplexity of a model on held-out data, JSON on stdout")
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="any --model spec, e.g. a merged directory"
    )
    add_eval(p)
    add_dtype(p)
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
