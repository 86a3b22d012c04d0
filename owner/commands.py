"""The `owner` commands: each turns parsed arguments into one recipe call and prints its result."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from offsite.emulator.corpus import SampleConfig
from offsite.emulator.layerwise import LayerwiseConfig
from offsite.emulator.package import PackageSpec
from offsite.emulator.recipe import EmulatorRecipe
from offsite.emulator.recipe_file import load_recipe, recipe_of_bundle
from offsite.errors import OffsiteError, spec_fields
from offsite.evaluation.five_settings import summary_table
from offsite.exchange.federation import FederationSpec
from offsite.recipes import home as home_recipes
from offsite.recipes.corpus import sample_public_corpus
from offsite.recipes.evaluate import EvaluateSpec, evaluate
from offsite.recipes.federate import federate_rounds
from offsite.recipes.merge import MergeRequest, merge_adapter
from offsite.recipes.package import package_emulator
from offsite.recipes.perplexity import model_perplexity
from offsite.training.config import TrainConfig
from offsite_cli.args import dtype_of, held_out, optional_path, peft_options
from offsite_cli.progress import counting_bar, training_bar
from offsite_cli.runner import print_json


def cmd_init(args: argparse.Namespace) -> None:
    print_json(home_recipes.create_home(Path(args.home), args.server_name))


def cmd_enroll(args: argparse.Namespace) -> None:
    print_json(home_recipes.enroll_data_owner(Path(args.home), args.name, Path(args.out)))


def cmd_revoke(args: argparse.Namespace) -> None:
    print_json(home_recipes.revoke_data_owner(Path(args.home), args.name))


def cmd_adapters(args: argparse.Namespace) -> None:
    print_json(home_recipes.list_adapters(Path(args.home)))


def cmd_cleanup(args: argparse.Namespace) -> None:
    print_json(home_recipes.clean_home(Path(args.home)))


def cmd_package(args: argparse.Namespace) -> None:
    spec = PackageSpec(
        out=Path(args.out), model=args.model, adapter_bottom=args.adapter_bottom, adapter_top=args.adapter_top,
        adapter_blocks=args.adapter_blocks, emulator_layers=args.emulator_layers, drop_ratio=args.drop_ratio,
        emulator_blocks=args.emulator_blocks, recipe=_recipe(args), dtype=dtype_of(args), overwrite=args.overwrite,
        stream=args.stream,
    )  # fmt: skip
    with training_bar("distilling") as bar:
        result = package_emulator(
            spec, home=optional_path(args.home), issued_to=args.for_, on_step=bar
        )
    print_json(result)


def _recipe(args: argparse.Namespace) -> EmulatorRecipe:
    if args.recipe is not None:
        return _recipe_from(args)
    with spec_fields("distill"):
        distill = TrainConfig(max_steps=args.distill_steps, learning_rate=args.distill_lr, warmup_steps=args.distill_warmup,
                              batch_size=args.distill_batch_size, lr_scheduler="cosine", save_every=args.save_every,
                              eval_every=args.distill_eval_every)  # fmt: skip
    layerwise = None
    if args.layerwise_steps < 0:
        raise OffsiteError(
            f"--layerwise-steps {args.layerwise_steps} must be >= 0 (0 turns it off)"
        )
    if args.layerwise_steps:
        with spec_fields("layerwise"):
            layerwise = LayerwiseConfig(steps=args.layerwise_steps, learning_rate=args.layerwise_lr,
                                        inputs=args.layerwise_inputs, noise=args.layerwise_noise,
                                        max_sequences=args.layerwise_sequences,
                                        grad_weight=args.layerwise_grad_weight,
                                        gate=not args.layerwise_no_gate)  # fmt: skip
    return EmulatorRecipe(
        selection="explicit" if args.emulator_blocks else args.selection,
        selection_data=optional_path(args.selection_data), layerwise=layerwise,
        distill_data=optional_path(args.distill_data), distill=distill, distill_weight=args.distill_weight,
        block_size=args.block_size, prune=args.prune, quantize_bits=args.quantize_bits,
        checkpoint_dir=_checkpoint_dir(args, args.distill_data), resume=args.resume,
    )  # fmt: skip


def _recipe_from(args: argparse.Namespace) -> EmulatorRecipe:
    """The recipe of --recipe (a file or a bundle), its data files and checkpoints from the flags."""
    given = vars(args)
    both = [d for d, default in args.recipe_options.items() if given[d] != default]
    if both:
        raise OffsiteError(
            f"--recipe and --{both[0].replace('_', '-')} both set the recipe; set it in the file"
        )
    path = Path(args.recipe)
    data = {k: Path(v) for k, v in (("selection_data", args.selection_data), ("distill_data", args.distill_data)) if v}  # fmt: skip
    recipe = recipe_of_bundle(path, data) if path.is_dir() else replace(load_recipe(path), **data)
    selection = "explicit" if args.emulator_blocks else recipe.selection
    return replace(recipe, selection=selection, resume=args.resume,
                   checkpoint_dir=_checkpoint_dir(args, recipe.distill_data))  # fmt: skip


def _checkpoint_dir(args: argparse.Namespace, distill_data) -> Path | None:
    """Where distillation checkpoints go: --checkpoint-dir, else OUT.ckpt when the recipe distils."""
    return optional_path(args.checkpoint_dir) or (
        Path(args.out + ".ckpt") if distill_data else None
    )


def cmd_merge(args: argparse.Namespace) -> None:
    req = MergeRequest(adapter=args.adapter, out=Path(args.out), bundle=optional_path(args.bundle), model=args.model,
                       home=optional_path(args.home), signer_key=optional_path(args.signer_key),
                       allow_unsigned=args.allow_unsigned, allow_revoked=args.allow_revoked, dtype=dtype_of(args),
                       overwrite=args.overwrite)  # fmt: skip
    print_json(merge_adapter(req))


def cmd_federate(args: argparse.Namespace) -> None:
    spec = FederationSpec(name=args.name, base_bundle=Path(args.bundle), model=args.model, members=args.members,
                          rounds=args.rounds, quorum=args.quorum, deadline_s=args.deadline,
                          max_weight_ratio=args.max_weight_ratio)  # fmt: skip
    show = lambda s: print(f"== round {s['round'] + 1}/{s['rounds']}: {s['state']} {s['members']}",  # noqa: E731
                           file=sys.stderr, flush=True)  # fmt: skip
    print_json(
        federate_rounds(Path(args.home), spec, poll_s=args.poll, once=args.once, on_status=show)
    )


def cmd_serve(args: argparse.Namespace) -> None:
    from owner.serve import serve

    serve(Path(args.home), args.listen, insecure=args.insecure_dev, chunk_bytes=args.chunk_bytes)


def cmd_evaluate_offsite(args: argparse.Namespace) -> None:
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                      warmup_steps=args.warmup_steps, seed=args.seed, save_every=0)  # fmt: skip
    spec = EvaluateSpec(bundle=Path(args.bundle), out=Path(args.out), model=args.model, tasks=tuple(args.task),
                        train_file=optional_path(args.train), test_file=optional_path(args.test),
                        data_root=args.data_root, train=cfg, full_learning_rate=args.full_learning_rate,
                        full_finetune=not args.no_full_finetune, block_size=args.block_size,
                        eval_limit=args.eval_limit, train_limit=args.train_limit, dtype=dtype_of(args),
                        overwrite=args.overwrite, peft=peft_options(args))  # fmt: skip
    phase = lambda task, name: print(f"== [{task}] {name}", file=sys.stderr, flush=True)  # noqa: E731
    with training_bar("training") as bar:
        results = evaluate(spec, on_step=bar, on_phase=phase)
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
    cfg = SampleConfig(documents=args.documents, tokens=args.tokens, batch_size=args.batch_size,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)  # fmt: skip
    advance, close = counting_bar(cfg.documents, "sampling")
    done = 0

    def on_batch(n: int, total: int) -> None:
        nonlocal done
        advance(n - done)
        done = n

    try:
        result = sample_public_corpus(Path(args.out), cfg, args.model, dtype_of(args), overwrite=args.overwrite,
                                      on_batch=on_batch)  # fmt: skip
    finally:
        close()
    print_json(result)


def cmd_evaluate(args: argparse.Namespace) -> None:
    ho = held_out(args)
    advance, close = counting_bar(ho.max_sequences, "evaluating")
    try:
        print_json(model_perplexity(ho, args.model, dtype_of(args), on_batch=advance))
    finally:
        close()
