"""The training loop: only parameters with requires_grad train; built on accelerate.

The same code runs on CPU, one GPU, and several processes (`torchrun --nproc_per_node N ...`).
Data order is a pure function of (seed, epoch, rank), so a resumed run sees exactly the batches
an uninterrupted one would have.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from transformers import get_scheduler

from offsite.atomic import write_json_atomic
from offsite.errors import OffsiteError
from offsite.evaluation.perplexity import batch_nll
from offsite.training.checkpoint import load_checkpoint, read_checkpoint_state, save_checkpoint
from offsite.training.data import TokenData, collate

log = logging.getLogger(__name__)

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
PRECISIONS = ("no", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; `max_steps` (optimizer steps) overrides `epochs` when set."""

    epochs: int = 1
    max_steps: int | None = None
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 42
    mixed_precision: str = "no"
    save_every: int = 50
    eval_every: int = 0

    def __post_init__(self) -> None:
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
        }
        for name, value in positive.items():
            if value < 1:
                raise OffsiteError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
        if self.max_steps is not None and self.max_steps < 1:
            raise OffsiteError(f"--max-steps must be at least 1 (got {self.max_steps})")
        if not self.learning_rate > 0:
            raise OffsiteError(f"--learning-rate must be positive (got {self.learning_rate})")
        if self.lr_scheduler not in SCHEDULES:
            raise OffsiteError(
                f"--lr-scheduler {self.lr_scheduler!r} unknown; choose one of {', '.join(SCHEDULES)}"
            )
        if self.mixed_precision not in PRECISIONS:
            raise OffsiteError(
                f"--mixed-precision {self.mixed_precision!r} unknown; choose one of {', '.join(PRECISIONS)}"
            )
        if self.warmup_steps < 0 or self.save_every < 0 or self.eval_every < 0:
            raise OffsiteError("--warmup-steps, --save-every and --eval-every must be >= 0")


@dataclass(frozen=True)
class StepInfo:
    """Progress after one optimizer step (reported on the main process only)."""

    step: int
    max_steps: int
    epoch: int
    loss: float
    learning_rate: float
    tokens: int
    tokens_per_s: float
    val_perplexity: float | None = None


def epoch_batches(n: int, cfg: TrainConfig, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches for `epoch`: a seeded shuffle, split evenly, cut to whole steps."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
    per_rank = n // world
    mine = perm[rank * per_rank : (rank + 1) * per_rank]
    batches = [mine[i : i + cfg.batch_size] for i in range(0, per_rank, cfg.batch_size)]
    return batches[: len(batches) // cfg.grad_accum * cfg.grad_accum]


def _no_accelerator() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps is not None and mps.is_available())


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """An Accelerator for `cfg`, with a clear error where the hardware lacks the precision."""
    try:
        # accelerate sets up gloo across `torchrun` CPU processes only when told cpu=True
        return Accelerator(
            gradient_accumulation_steps=cfg.grad_accum,
            mixed_precision=cfg.mixed_precision,
            cpu=_no_accelerator(),
        )
    except (ValueError, RuntimeError) as e:
        raise OffsiteError(
            f"--mixed-precision {cfg.mixed_precision}: {str(e).splitlines()[0]}"
        ) from None


def _validate(acc: Accelerator, model, data: TokenData, cfg: TrainConfig, pad_id: int) -> float:
    model.eval()
    mine = data.examples[acc.process_index :: acc.num_processes]
    total = torch.zeros(2, device=acc.device)
    with torch.no_grad():
        for i in range(0, len(mine), cfg.batch_size):
            batch = {
                k: v.to(acc.device)
                for k, v in collate(mine[i : i + cfg.batch_size], pad_id).items()
            }
            with acc.autocast():
                nll, n = batch_nll(model, batch)
            total += torch.stack([nll.float(), n.float()])
    total = acc.reduce(total, reduction="sum")
    model.train()
    return math.exp(float(total[0]) / max(float(total[1]), 1.0))


LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own next-token loss (labels shifted inside the model)."""
    return model(**batch).loss


class _Best:
    """The trainable weights with the lowest validation perplexity so far (kept on disk if possible)."""

    def __init__(self, root: Path | None) -> None:
        self.root, self.state, self.step, self.perplexity = root, None, None, math.inf
        if root is not None and (root / "best.json").is_file():
            info = json.loads((root / "best.json").read_text())
            self.step, self.perplexity = info["step"], info["val_perplexity"]
            self.state = load_file(str(root / "best.safetensors"))

    def offer(self, model: torch.nn.Module, step: int, perplexity: float, is_main: bool) -> None:
        if not perplexity < self.perplexity:
            return
        self.step, self.perplexity = step, perplexity
        self.state = {
            n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad
        }
        if self.root is not None and is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            save_file(self.state, str(self.root / "best.safetensors"))
            write_json_atomic(self.root / "best.json", {"step": step, "val_perplexity": perplexity})

    @torch.no_grad()
    def restore(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, value in (self.state or {}).items():
            params[name].copy_(value)


def _restore_or_refuse(
    checkpoint_dir: Path | None, resume: bool, run_key: dict, model, optimizer, scheduler
) -> int:
    """The step to start from: a matching checkpoint's with --resume, else 0 (refusing to clobber one)."""
    state = read_checkpoint_state(checkpoint_dir) if checkpoint_dir is not None else None
    if state is None:
        return 0
    if not resume:
        raise OffsiteError(
            f"{checkpoint_dir}: a checkpoint exists; pass --resume to continue it or delete it"
        )
    if state.get("run_key") != run_key:
        raise OffsiteError(
            f"{checkpoint_dir}: checkpoint was made with other data, bundle or settings; drop --resume or delete it"
        )
    load_checkpoint(checkpoint_dir, model, optimizer, scheduler)
    log.info("resumed from step %d", state["step"])
    return int(state["step"])


def _steps_per_epoch(train_data: TokenData, cfg: TrainConfig, world: int) -> int:
    steps = len(epoch_batches(len(train_data), cfg, 0, 0, world)) // cfg.grad_accum
    if steps == 0:
        raise OffsiteError(
            f"{train_data.source}: {len(train_data)} training examples are fewer than one step needs "
            f"(batch {cfg.batch_size} x accumulation {cfg.grad_accum} x {world} processes); lower --batch-size or add data"
        )
    return steps


def train(
    model: torch.nn.Module,
    train_data: TokenData,
    cfg: TrainConfig,
    *,
    pad_id: int,
    val_data: TokenData | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    run_key: dict | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    accelerator: Accelerator | None = None,
    loss_fn: LossFn = lm_loss,
    keep_best: bool = False,
) -> dict:
    """Train the parameters of `model` that require grad; returns a JSON-ready summary.

    `loss_fn(model, batch)` gives the loss (default: the LM loss); with `keep_best` the weights
    with the best validation perplexity are restored at the end.
    """
    acc = accelerator or make_accelerator(cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise OffsiteError("nothing to train: no parameter requires grad")
    steps_per_epoch = _steps_per_epoch(train_data, cfg, acc.num_processes)
    max_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max_steps
    )
    run_key = {
        **(run_key or {}),
        "data": train_data.sha256,
        "config": {**asdict(cfg), "max_steps": None, "epochs": None},
    }
    step = _restore_or_refuse(checkpoint_dir, resume, run_key, model, optimizer, scheduler)
    best = _Best(checkpoint_dir if keep_best else None)

    model.train()
    model, optimizer = acc.prepare(model, optimizer)
    history: list[dict] = []
    tokens, t0, val_ppl, losses = 0, time.perf_counter(), None, []
    while step < max_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        batches = epoch_batches(len(train_data), cfg, epoch, acc.process_index, acc.num_processes)
        for micro, ix in enumerate(batches[done_in_epoch * cfg.grad_accum :]):
            batch = {
                k: v.to(acc.device)
                for k, v in collate([train_data.examples[i] for i in ix], pad_id).items()
            }
            with acc.accumulate(model), acc.autocast():
                loss = loss_fn(model, batch)
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(trainable, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            tokens += int(batch["attention_mask"].sum()) * acc.num_processes
            losses.append(float(loss.detach()))
            if (micro + 1) % cfg.grad_accum:
                continue
            scheduler.step()
            step += 1
            step_loss = float(
                acc.reduce(torch.tensor(sum(losses) / len(losses), device=acc.device), "mean")
            )
            losses = []
            if val_data is not None and (
                step == max_steps or (cfg.eval_every and step % cfg.eval_every == 0)
            ):
                val_ppl = _validate(acc, model, val_data, cfg, pad_id)
                if keep_best:
                    best.offer(acc.unwrap_model(model), step, val_ppl, acc.is_main_process)
            history.append(
                {
                    "step": step,
                    "loss": step_loss,
                    **({"val_perplexity": val_ppl} if val_ppl else {}),
                }
            )
            if (
                checkpoint_dir is not None
                and cfg.save_every
                and step % cfg.save_every == 0
                and step < max_steps
            ):
                if acc.is_main_process:
                    save_checkpoint(
                        checkpoint_dir,
                        acc.unwrap_model(model),
                        optimizer,
                        scheduler,
                        {"step": step, "run_key": run_key},
                    )
                acc.wait_for_everyone()
            if on_step and acc.is_main_process:
                elapsed = time.perf_counter() - t0
                on_step(
                    StepInfo(
                        step,
                        max_steps,
                        epoch,
                        step_loss,
                        scheduler.get_last_lr()[0],
                        tokens,
                        tokens / elapsed,
                        val_ppl,
                    )
                )
            if step >= max_steps:
                break
    acc.wait_for_everyone()
    if keep_best and best.state is not None:
        best.restore(acc.unwrap_model(model))
    return {
        "steps": step,
        "max_steps": max_steps,
        "steps_per_epoch": steps_per_epoch,
        "train_examples": len(train_data),
        "val_examples": len(val_data) if val_data is not None else 0,
        "final_loss": history[-1]["loss"] if history else None,
        "val_perplexity": val_ppl,
        "best_step": best.step if keep_best else None,
        "best_val_perplexity": best.perplexity if keep_best and best.state is not None else None,
        "tokens_this_run": tokens,
        "seconds_this_run": round(time.perf_counter() - t0, 3),
        "processes": acc.num_processes,
        "data_sha256": train_data.sha256,
        "config": asdict(cfg),
        "history": history,
    }
