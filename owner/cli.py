"""`owner`: package an emulator bundle, merge a returned adapter, evaluate a model."""

from __future__ import annotations

import argparse
import json

from offsite.adapter import open_adapter, plug_adapter, save_merged, verify_adapter
from offsite.architectures import num_blocks
from offsite.atomic import check_output_dir
from offsite.bundle import open_bundle, package_emulator
from offsite.evaluation import perplexity_on_file
from offsite.fingerprint import model_fingerprint
from offsite.loading import DEFAULT_MODEL, load_model, load_tokenizer
from offsite.split import make_plan
from offsite_cli.args import add_dtype, add_eval, dtype_of, int_list
from offsite_cli.progress import counting_bar
from offsite_cli.runner import make_parser, print_json, run, subparsers

MERGE_RECORD = "offsite_merge.json"


def cmd_package(args: argparse.Namespace) -> None:
    check_output_dir(args.out, args.overwrite)
    model = load_model(args.model, dtype=dtype_of(args))
    plan = make_plan(
        num_blocks(model.config),
        adapter_bottom=args.adapter_bottom, adapter_top=args.adapter_top, adapter_blocks=args.adapter_blocks,
        emulator_layers=args.emulator_layers, drop_ratio=args.drop_ratio, kept_blocks=args.emulator_blocks,
    )  # fmt: skip
    bundle = package_emulator(
        model,
        load_tokenizer(args.model),
        plan,
        args.out,
        base_name=args.model,
        overwrite=args.overwrite,
        inplace=True,
    )
    print_json({"bundle": str(bundle.path), "bundle_id": bundle.bundle_id, "adapter_blocks": list(plan.adapter),
                "kept_blocks": list(plan.kept), "dropped_blocks": list(plan.dropped)})  # fmt: skip


def cmd_merge(args: argparse.Namespace) -> None:
    check_output_dir(args.out, args.overwrite)
    adapter = open_adapter(args.adapter)
    bundle_id = open_bundle(args.bundle).bundle_id if args.bundle else None
    model = load_model(args.model, dtype=dtype_of(args))
    fingerprint = model_fingerprint(model)
    state = verify_adapter(adapter, model, fingerprint, bundle_id=bundle_id)
    plug_adapter(model, state)
    out = save_merged(model, load_tokenizer(args.model), args.out, overwrite=args.overwrite)
    record = {"base_fingerprint": fingerprint, "bundle_id": adapter.manifest["bundle_id"],
              "adapter_blocks": adapter.blocks, "adapter": str(adapter.path)}  # fmt: skip
    (out / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    print_json({"merged": str(out), **record})


def cmd_evaluate(args: argparse.Namespace) -> None:
    model = load_model(args.model, dtype=dtype_of(args))
    advance, close = counting_bar(args.max_sequences or 0, "evaluating")
    try:
        result = perplexity_on_file(
            model, load_tokenizer(args.model), args.data, block_size=args.block_size,
            batch_size=args.batch_size, max_sequences=args.max_sequences, on_batch=advance,
        )  # fmt: skip
    finally:
        close()
    print_json({"model": args.model, **result})


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "owner", "Model owner: package emulators, merge returned adapters, evaluate."
    )
    sub = subparsers(parser)

    p = sub.add_parser("package-emulator", help="full model in, emulator bundle out")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub id, HF directory, .gguf file, or {DEFAULT_MODEL} (default)",
    )
    p.add_argument("--out", required=True, help="bundle directory to create")
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
    p.set_defaults(func=cmd_package)

    p = sub.add_parser(
        "merge-adapter", help="verify a returned adapter and plug it into the full model"
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="the full model the bundle was made from")
    p.add_argument("--adapter", required=True, help="adapter directory returned by the data owner")
    p.add_argument(
        "--bundle", default=None, help="also check the adapter was trained from this bundle"
    )
    p.add_argument("--out", required=True, help="merged Hugging Face model directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    add_dtype(p)
    p.set_defaults(func=cmd_merge)

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
