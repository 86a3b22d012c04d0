"""The `owner` commands: each turns parsed arguments into one library recipe call."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from offsite.artefacts.merge import MergeSpec, merge
from offsite.artefacts.signing import load_public_file
from offsite.emulator.corpus import SampleConfig, sample_corpus, write_corpus
from offsite.emulator.layerwise import LayerwiseConfig
from offsite.emulator.package import PackageSpec, package
from offsite.emulator.recipe import EmulatorRecipe
from offsite.errors import OffsiteError
from offsite.evaluation.five_settings import summary_table
from offsite.evaluation.recipe import EvaluateSpec, evaluate
from offsite.exchange.federation import FederationSpec, federate
from offsite.exchange.home import enroll, init_home, issue_bundle, merge_inputs, open_home
from offsite.models.loading import DEFAULT_MODEL, load_model, load_tokenizer
from offsite.training.loop import TrainConfig
from offsite_cli.args import dtype_of, peft_options
from offsite_cli.progress import TrainingBar, counting_bar, perplexity_with_bar
from offsite_cli.runner import print_json


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
    enroll(open_home(args.home), args.name, out)
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
    spec = PackageSpec(
        out=Path(args.out), model=args.model, adapter_bottom=args.adapter_bottom, adapter_top=args.adapter_top,
        adapter_blocks=args.adapter_blocks, emulator_layers=args.emulator_layers, drop_ratio=args.drop_ratio,
        emulator_blocks=args.emulator_blocks, recipe=_recipe(args), dtype=dtype_of(args), overwrite=args.overwrite,
        stream=args.stream,
    )  # fmt: skip
    bar = TrainingBar("distilling")
    try:
        if args.home:
            bundle = issue_bundle(open_home(args.home), args.for_, spec, on_step=bar)
        else:
            bundle = package(spec, on_step=bar)
    finally:
        bar.close()
    e = bundle.manifest["emulator"]
    print_json({"bundle": str(bundle.path), "bundle_id": bundle.bundle_id, "issued_to": args.for_,
                "adapter_blocks": bundle.adapter_sources, "kept_blocks": e["kept"], "dropped_blocks": e["dropped"]})  # fmt: skip


def _recipe(args: argparse.Namespace) -> EmulatorRecipe:
    distill = TrainConfig(max_steps=args.distill_steps, learning_rate=args.distill_lr, warmup_steps=args.distill_warmup,
                          batch_size=args.distill_batch_size, lr_scheduler="cosine", save_every=args.save_every,
                          eval_every=args.distill_eval_every)  # fmt: skip
    path = lambda value: Path(value) if value else None  # noqa: E731
    if args.layerwise_steps < 0:
        raise OffsiteError(
            f"--layerwise-steps {args.layerwise_steps} must be >= 0 (0 turns it off)"
        )
    layerwise = None
    if args.layerwise_steps:
        layerwise = LayerwiseConfig(steps=args.layerwise_steps, learning_rate=args.layerwise_lr, inputs=args.layerwise_inputs,
                                    noise=args.layerwise_noise, max_sequences=args.layerwise_sequences,
                                    grad_weight=args.layerwise_grad_weight)  # fmt: skip
    return EmulatorRecipe(
        selection="explicit" if args.emulator_blocks else args.selection, selection_data=path(args.selection_data),
        layerwise=layerwise,
        distill_data=path(args.distill_data), distill=distill, distill_weight=args.distill_weight,
        block_size=args.block_size, prune=args.prune, quantize_bits=args.quantize_bits,
        checkpoint_dir=path(args.checkpoint_dir) or (Path(args.out + ".ckpt") if args.distill_data else None),
        resume=args.resume,
    )  # fmt: skip


def cmd_merge(args: argparse.Namespace) -> None:
    signer, revoked = None, None
    if args.home:
        found = merge_inputs(open_home(args.home), args.adapter, args.bundle, args.allow_revoked)
        adapter, bundle, key, model = found.adapter, found.bundle, found.key, found.model
        signer, revoked = found.signer, found.signer_revoked_at
    elif args.allow_revoked:
        raise OffsiteError(
            "--allow-revoked goes with --home: only the registry knows who is revoked"
        )
    elif args.bundle is None:
        raise OffsiteError(
            "--bundle is required without --home: the adapter is checked against the blocks the bundle made trainable"
        )
    else:
        adapter, bundle, model = Path(args.adapter), Path(args.bundle), DEFAULT_MODEL
        key = load_public_file(args.signer_key) if args.signer_key else None
    spec = MergeSpec(adapter=adapter, bundle=bundle, out=Path(args.out), model=args.model or model, signer_key=key,
                     allow_unsigned=args.allow_unsigned, dtype=dtype_of(args), overwrite=args.overwrite,
                     signer=signer, signer_revoked_at=revoked)  # fmt: skip
    print_json(merge(spec))


def cmd_cleanup(args: argparse.Namespace) -> None:
    from offsite.exchange.service import OwnerService

    service = OwnerService(open_home(args.home))  # expires stale uploads and leftover folders
    try:
        done = service.at_start  # what opening the service removed: stale uploads, stray folders
    finally:
        service.close()
    print_json(done)


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


def cmd_federate(args: argparse.Namespace) -> None:
    """Run (or resume) FedAvg rounds: issue each round's bundles, wait for the adapters, average."""
    spec = FederationSpec(name=args.name, base_bundle=Path(args.bundle), model=args.model, members=args.members,
                          rounds=args.rounds, quorum=args.quorum, deadline_s=args.deadline,
                          max_weight_ratio=args.max_weight_ratio)  # fmt: skip
    show = lambda s: print(f"== round {s['round'] + 1}/{s['rounds']}: {s['state']} {s['members']}",  # noqa: E731
                           file=sys.stderr, flush=True)  # fmt: skip
    print_json(
        federate(open_home(args.home), spec, poll_s=args.poll, once=args.once, on_status=show)
    )


def cmd_serve(args: argparse.Namespace) -> None:
    from owner.serve import serve

    serve(
        open_home(args.home), args.listen, insecure=args.insecure_dev, chunk_bytes=args.chunk_bytes
    )


def cmd_evaluate_offsite(args: argparse.Namespace) -> None:
    path = lambda value: Path(value) if value else None  # noqa: E731
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                      warmup_steps=args.warmup_steps, seed=args.seed, save_every=0)  # fmt: skip
    spec = EvaluateSpec(bundle=Path(args.bundle), out=Path(args.out), model=args.model, tasks=tuple(args.task),
                        train_file=path(args.train), test_file=path(args.test), data_root=args.data_root, train=cfg,
                        full_learning_rate=args.full_learning_rate, full_finetune=not args.no_full_finetune,
                        block_size=args.block_size, eval_limit=args.eval_limit, train_limit=args.train_limit,
                        dtype=dtype_of(args), overwrite=args.overwrite, peft=peft_options(args))  # fmt: skip
    bar = TrainingBar("training")
    try:
        results = evaluate(spec, on_step=bar,
                           on_phase=lambda task, name: print(f"== [{task}] {name}", file=sys.stderr, flush=True))  # fmt: skip
    finally:
        bar.close()
    if args.format == "md":
        print(summary_table(results), end="")
    else:
        print_json(
            {
                "out": str(spec.out),
                "results": [{k: v for k, v in r.items() if k != "curves"} for r in results],
            }
        )


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
