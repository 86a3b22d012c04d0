"""Argument groups used by more than one command, and their conversion to library configs."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from offsite.artefacts.peft_delta import PeftOptions
from offsite.artefacts.peft_methods import METHODS
from offsite.errors import OffsiteError, spec_fields
from offsite.recipes.perplexity import HeldOut
from offsite.training.config import PRECISIONS, SCHEDULES, TrainConfig
from offsite.training.finetune import ADAPTER_LEARNING_RATE, FinetuneJob
from offsite.training.privacy import ACCOUNTANTS, DEFAULT_DELTA, DPConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def int_list(text: str) -> tuple[int, ...]:
    """'0,1,28,29' -> (0, 1, 28, 29)."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of block indices"
        ) from None


def add_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        choices=["auto", *sorted(DTYPES)],
        default="auto",
        help="weights dtype (default auto: the model's own, as stored; a GGUF file loads as bfloat16)",
    )


def dtype_of(args: argparse.Namespace) -> torch.dtype | None:
    return DTYPES.get(args.dtype)


def optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def held_out(args: argparse.Namespace) -> HeldOut:
    """The held-out file the evaluation options describe (--data, --block-size, ...)."""
    return HeldOut(Path(args.data), block_size=args.block_size, batch_size=args.batch_size,
                   max_sequences=args.max_sequences)  # fmt: skip


def add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="held-out .txt or .jsonl")
    p.add_argument(
        "--block-size", type=int, default=512, help="tokens per evaluated sequence (default 512)"
    )
    p.add_argument(
        "--batch-size", type=int, default=4, help="sequences per forward pass (default 4)"
    )
    p.add_argument(
        "--max-sequences", type=int, default=None, help="evaluate only the first N sequences"
    )


def add_training(p: argparse.ArgumentParser, overwrite: bool = True) -> None:
    d = TrainConfig(learning_rate=ADAPTER_LEARNING_RATE)  # the data owner trains adapter blocks
    g = p.add_argument_group("training")
    g.add_argument(
        "--epochs", type=int, default=d.epochs, help=f"passes over the data (default {d.epochs})"
    )
    g.add_argument(
        "--max-steps", type=int, default=None, help="optimizer steps; overrides --epochs"
    )
    g.add_argument(
        "--learning-rate",
        "--lr",
        type=float,
        default=d.learning_rate,
        help=f"peak learning rate (default {d.learning_rate})",
    )
    g.add_argument(
        "--lr-scheduler",
        choices=SCHEDULES,
        default=d.lr_scheduler,
        help=f"schedule (default {d.lr_scheduler})",
    )
    g.add_argument(
        "--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps (default 0)"
    )
    g.add_argument(
        "--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default 0)"
    )
    _add_batching(g, d, overwrite)


def _add_batching(g, d: TrainConfig, overwrite: bool) -> None:
    job = FinetuneJob.__dataclass_fields__
    g.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help=f"sequences per process per micro-step (default {d.batch_size})",
    )
    g.add_argument(
        "--grad-accum",
        type=int,
        default=d.grad_accum,
        help="micro-steps per optimizer step (default 1)",
    )
    g.add_argument(
        "--max-grad-norm",
        type=float,
        default=d.max_grad_norm,
        help="gradient clipping, 0 = off (default 1.0)",
    )
    g.add_argument(
        "--block-size",
        type=int,
        default=job["block_size"].default,
        help=f"tokens per training sequence (default {job['block_size'].default})",
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=job["val_fraction"].default,
        help=f"share of sequences held out for validation (default {job['val_fraction'].default})",
    )
    _add_run(g, d, overwrite)


def add_peft(p: argparse.ArgumentParser) -> None:
    """PEFT inside the adapter blocks (LoRA, IA3, LN tuning, a soft prompt) instead of training them."""
    d = PeftOptions("lora")
    g = p.add_argument_group("PEFT inside the adapter (default: the adapter blocks train in full)")
    g.add_argument("--peft", choices=tuple(METHODS), default=None,
                   help="; ".join(f"{m.name}: {m.trains}" for m in METHODS.values()))  # fmt: skip
    g.add_argument("--lora-rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    g.add_argument(
        "--lora-alpha", type=float, default=d.alpha, help=f"LoRA alpha (default {d.alpha:g})"
    )
    g.add_argument("--lora-dropout", type=float, default=d.dropout, help="LoRA dropout (default 0)")
    g.add_argument("--peft-targets", type=lambda t: tuple(x for x in t.split(",") if x), default=(),
                   help="modules inside a block, comma-separated (default: the registry's for the method)")  # fmt: skip
    g.add_argument("--peft-virtual-tokens", type=int, default=d.virtual_tokens,
                   help=f"soft-prompt length for --peft prompt (default {d.virtual_tokens})")  # fmt: skip


def add_dp(p: argparse.ArgumentParser) -> None:
    """DP-SGD for the data owner (opacus): the guarantee the returned adapter is trained under."""
    g = p.add_argument_group(
        "differential privacy (DP-SGD; --max-grad-norm is the per-sample clip norm)"
    )
    g.add_argument(
        "--dp-epsilon",
        type=float,
        default=None,
        help="train under (epsilon, delta)-DP over the whole run",
    )
    g.add_argument(
        "--dp-delta",
        type=float,
        default=None,
        help="delta (default 1e-5; pick one below 1/(number of training examples))",
    )
    g.add_argument(
        "--dp-accountant",
        choices=ACCOUNTANTS,
        default="rdp",
        help="privacy accountant (default rdp)",
    )


def peft_options(args: argparse.Namespace) -> PeftOptions | None:
    """The PeftOptions the PEFT arguments describe, or None without --peft (validated)."""
    if args.peft is None:
        return None
    with spec_fields("peft"):
        return PeftOptions(args.peft, rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                           targets=args.peft_targets, virtual_tokens=args.peft_virtual_tokens)  # fmt: skip


def _add_run(g, d: TrainConfig, overwrite: bool) -> None:
    g.add_argument(
        "--seed", type=int, default=d.seed, help=f"data order and init seed (default {d.seed})"
    )
    g.add_argument(
        "--mixed-precision",
        choices=PRECISIONS,
        default=d.mixed_precision,
        help="bf16/fp16 autocast where the hardware has it",
    )
    g.add_argument(
        "--loss-chunk-tokens",
        type=int,
        default=d.loss_chunk_tokens,
        help=f"compute the loss this many positions at a time, 0 = all at once (default {d.loss_chunk_tokens})",
    )
    g.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute block activations in the backward pass (less memory, more compute)",
    )
    g.add_argument(
        "--low-memory",
        action="store_true",
        help="lower peak memory on CPU for some speed: freed activations go back to the system at "
        "once, and with --gradient-checkpointing in float32 a bf16 bundle's frozen weights stay "
        "bf16 (same results)",
    )
    g.add_argument(
        "--save-every",
        type=int,
        default=d.save_every,
        help=f"checkpoint every N steps, 0 = never (default {d.save_every})",
    )
    g.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help="validate every N steps (default: at the end)",
    )
    g.add_argument(
        "--checkpoint-dir",
        default=None,
        help="where checkpoints go (default: OUT.ckpt beside --out)",
    )
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    g.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep the checkpoint directory after success",
    )
    if overwrite:
        g.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def _dp(args: argparse.Namespace) -> DPConfig | None:
    if getattr(args, "dp_epsilon", None) is None:
        if getattr(args, "dp_delta", None) is not None:
            raise OffsiteError("--dp-delta needs --dp-epsilon")
        return None
    delta = args.dp_delta if args.dp_delta is not None else DEFAULT_DELTA
    with spec_fields("dp"):
        return DPConfig(
            args.dp_epsilon, delta, max_grad_norm=args.max_grad_norm, accountant=args.dp_accountant
        )


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the training options describe (validated)."""
    try:
        return TrainConfig(
            epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.learning_rate,
            lr_scheduler=args.lr_scheduler, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
            batch_size=args.batch_size, grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm,
            seed=args.seed, mixed_precision=args.mixed_precision, save_every=args.save_every,
            eval_every=args.eval_every, loss_chunk_tokens=args.loss_chunk_tokens,
            gradient_checkpointing=args.gradient_checkpointing, dp=_dp(args),
        )  # fmt: skip
    except TypeError as e:  # pragma: no cover - a programming error, not user input
        raise OffsiteError(str(e)) from None
