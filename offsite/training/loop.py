"""The training loop: only parameters with requires_grad train; built on accelerate.

The same code runs on CPU, one GPU, and several processes (`torchrun --nproc_per_node N ...`).
Data order is a pure function of (seed, epoch, rank), so a resumed run sees exactly the batches
an uninterrupted one would have.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from transformers import get_scheduler

from offsite.errors import OffsiteError
from offsite.training.checkpoint import (
    BestWeights,
    claim_checkpoint_dir,
    load_checkpoint,
    read_checkpoint_state,
    save_checkpoint,
)
from offsite.training.config import StepInfo, TrainConfig
from offsite.training.data import TokenData, collate
from offsite.training.loss import (
    LossFn,
    batch_nll,
    causal_lm_of,
    chunked_lm_loss,
    lm_loss,
)
from offsite.training.precision import Precision, precision_for
from offsite.training.privacy import privatize, spent

log = logging.getLogger(__name__)


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
    """The process's Accelerator, always in full precision (`precision.py`: each run applies its
    own `mixed_precision`), checked against the hardware for `cfg`'s."""
    try:
        # accelerate sets up gloo across `torchrun` CPU processes only when told cpu=True
        acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision="no",
                          cpu=_no_accelerator())  # fmt: skip
    except (ValueError, RuntimeError) as e:  # e.g. an Accelerator of another precision made first
        raise OffsiteError(f"accelerate: {str(e).splitlines()[0]}") from None
    precision_for(cfg.mixed_precision, acc.device)
    return acc


def _validate(acc: Accelerator, model, data: TokenData, cfg: TrainConfig, pad_id: int,
              precision: Precision) -> float:  # fmt: skip
    model.eval()
    mine = data.examples[acc.process_index :: acc.num_processes]
    total = torch.zeros(2, device=acc.device)
    with torch.no_grad():
        for i in range(0, len(mine), cfg.batch_size):
            batch = {
                k: v.to(acc.device)
                for k, v in collate(mine[i : i + cfg.batch_size], pad_id).items()
            }
            with precision.autocast():
                nll, n = batch_nll(model, batch, cfg.loss_chunk_tokens)
            total += torch.stack([nll.float(), n.float()])
    total = acc.reduce(total, reduction="sum")
    model.train()
    return math.exp(float(total[0]) / max(float(total[1]), 1.0))


def _restore_or_refuse(
    checkpoint_dir: Path | None, resume: bool, run_key: dict, model, optimizer, scheduler
) -> int:
    """The step to start from: a matching checkpoint's with --resume, else 0 (refusing to clobber one)."""
    state = read_checkpoint_state(checkpoint_dir) if checkpoint_dir is not None else None
    if state is None:
        return 0
    if not resume:
        raise OffsiteError(
            f"{checkpoint_dir}: a checkpoint exists; pass `resume` to continue it or delete it"
        )
    if state.get("run_key") != run_key:
        raise OffsiteError(
            f"{checkpoint_dir}: checkpoint was made with other data, bundle or settings; drop `resume` or delete it"
        )
    load_checkpoint(checkpoint_dir, model, optimizer, scheduler)
    log.info("resumed from step %d", state["step"])
    return int(state["step"])


def _dp_order_seed(checkpoint_dir: Path | None, step: int) -> int:
    """A DP run's secret batch-order seed: drawn from the OS's entropy at a fresh start, read
    back from the run's own (local) checkpoint when it resumes."""
    state = read_checkpoint_state(checkpoint_dir) if step and checkpoint_dir is not None else None
    if state is not None and isinstance(state.get("order_seed"), int):
        return state["order_seed"]
    return secrets.randbits(62)


def _steps_per_epoch(train_data: TokenData, cfg: TrainConfig, world: int) -> int:
    steps = len(epoch_batches(len(train_data), cfg, 0, 0, world)) // cfg.grad_accum
    if steps == 0:
        raise OffsiteError(
            f"{train_data.source}: {len(train_data)} training examples are fewer than one step needs "
            f"(batch {cfg.batch_size} x accumulation {cfg.grad_accum} x {world} processes); lower `batch_size` or add data"
        )
    return steps


@dataclass
class _Progress:
    """What a run has done so far: for the step reports and the summary."""

    max_steps: int
    step: int = 0
    tokens: int = 0
    val_ppl: float | None = None
    t0: float = field(default_factory=time.perf_counter)
    history: list[dict] = field(default_factory=list)

    def record(self, loss: float) -> None:
        if not math.isfinite(loss):
            raise OffsiteError(
                f"the loss became {loss} at step {self.step}; lower `learning_rate` (or check the data)"
            )
        entry = {"step": self.step, "loss": loss}
        self.history.append({**entry, "val_perplexity": self.val_ppl} if self.val_ppl else entry)

    def info(self, epoch: int, lr: float) -> StepInfo:
        elapsed = time.perf_counter() - self.t0
        return StepInfo(self.step, self.max_steps, epoch, self.history[-1]["loss"], lr, self.tokens,
                        self.tokens / elapsed, self.val_ppl)  # fmt: skip


def _micro_batches(
    data: TokenData, cfg: TrainConfig, acc: Accelerator, start: int, per_epoch: int, pad_id: int
):
    """(epoch, micro-batch index, batch) from optimizer step `start` on, epoch after epoch."""
    epoch, done = divmod(start, per_epoch)
    while True:
        batches = epoch_batches(len(data), cfg, epoch, acc.process_index, acc.num_processes)
        for micro, ix in enumerate(batches[done * cfg.grad_accum :]):
            batch = collate([data.examples[i] for i in ix], pad_id)
            yield epoch, micro, {k: v.to(acc.device) for k, v in batch.items()}
        epoch, done = epoch + 1, 0


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, max_steps: int):
    """AdamW over the parameters that require grad (state for nothing else), and its schedule."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise OffsiteError("nothing to train: no parameter requires grad")
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return trainable, optimizer, _schedule(optimizer, cfg, max_steps)


def _schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, max_steps: int) -> LRScheduler:
    """`cfg.lr_scheduler` over `max_steps`; for part i of n, the i-th `max_steps` of the same shape
    laid over n * `max_steps` (warm-up only where it falls in this part)."""
    part, parts = cfg.schedule_part
    whole = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                          num_training_steps=max_steps * parts)  # fmt: skip
    if part == 0:
        return whole
    shape, offset = whole.lr_lambdas[0], part * max_steps
    return LambdaLR(optimizer, lambda step: shape(step + offset))


@dataclass(frozen=True)
class _Context:
    """What the per-step bookkeeping needs to know about the run."""

    acc: Accelerator
    cfg: TrainConfig
    pad_id: int
    val_data: TokenData | None
    checkpoint_dir: Path | None
    run_key: dict
    keep_best: bool
    order_seed: int  # the batch order's seed (under DP a secret, kept only in local checkpoints)
    precision: Precision
    loss_fn: LossFn
    trainable: list[torch.nn.Parameter]
    on_step: Callable[[StepInfo], None] | None


def _after_step(
    ctx: _Context, run: _Progress, loss: float, model, optimizer, scheduler, best: BestWeights
) -> None:
    """Validate (keeping the best weights), record the loss, checkpoint: what follows an optimizer step."""
    acc, cfg = ctx.acc, ctx.cfg
    if ctx.val_data is not None and (
        run.step == run.max_steps or (cfg.eval_every and run.step % cfg.eval_every == 0)
    ):
        run.val_ppl = _validate(acc, model, ctx.val_data, cfg, ctx.pad_id, ctx.precision)
        if ctx.keep_best:
            best.offer(acc.unwrap_model(model), run.step, run.val_ppl, acc.is_main_process)
    run.record(loss)
    if (
        ctx.checkpoint_dir is not None
        and cfg.save_every
        and run.step % cfg.save_every == 0
        and run.step < run.max_steps
    ):
        if acc.is_main_process:
            save_checkpoint(ctx.checkpoint_dir, acc.unwrap_model(model), optimizer, scheduler,
                            {"step": run.step, "run_key": ctx.run_key, "order_seed": ctx.order_seed})  # fmt: skip
        acc.wait_for_everyone()


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
    loss_fn: LossFn | None = None,
    keep_best: bool = False,
) -> dict:
    """Train the parameters of `model` that require grad with `loss_fn`; returns a JSON-ready summary
    (`keep_best`: restore the weights with the best validation perplexity at the end)."""
    acc = accelerator or make_accelerator(cfg)
    loss_fn = loss_fn or _loss_and_checkpointing(model, cfg)
    per_epoch = _steps_per_epoch(train_data, cfg, acc.num_processes)
    run = _Progress(cfg.max_steps or cfg.epochs * per_epoch)
    trainable, optimizer, scheduler = _optimizer(model, cfg, run.max_steps)
    private = None  # DP-SGD: per-sample clipping and noise instead of plain clipping
    if cfg.dp is not None:
        model, optimizer, private = _privately(model, optimizer, cfg, len(train_data), acc, run.max_steps)  # fmt: skip
    run_key = {**(run_key or {}), "data": train_data.sha256, "config": {**asdict(cfg), "max_steps": None, "epochs": None}}  # fmt: skip
    run_key = json.loads(json.dumps(run_key))  # as a checkpoint stores it (tuples become lists)
    run.step, best = _resume(acc, checkpoint_dir, resume, run_key, keep_best, model, optimizer, scheduler)  # fmt: skip
    # the batch order: seeded by --seed, or under DP-SGD by a secret (the accountant's sampling
    # amplification holds only if whoever sees the adapter cannot know which records a step drew)
    order = replace(cfg, seed=_dp_order_seed(checkpoint_dir, run.step)) if cfg.dp else cfg
    model.train()
    model, optimizer = acc.prepare(model, optimizer)
    precision = precision_for(cfg.mixed_precision, acc.device)
    ctx = _Context(acc, cfg, pad_id, val_data, checkpoint_dir, run_key, keep_best, order.seed,
                   precision, loss_fn, trainable, on_step)  # fmt: skip
    _steps(ctx, run, train_data, per_epoch, model, optimizer, scheduler, best)
    acc.wait_for_everyone()
    if keep_best and best.state is not None:
        best.restore(acc.unwrap_model(model))
    summary = _summary(run, cfg, train_data, val_data, best if keep_best else None, acc.num_processes, per_epoch)  # fmt: skip
    if private is not None:
        acc.unwrap_model(model).remove_hooks()  # the caller's model is left without opacus's hooks
        summary["differential_privacy"] = spent(cfg.dp, *private, run.step)
    return summary


def _steps(ctx: _Context, run: _Progress, data: TokenData, per_epoch: int, model, optimizer, scheduler,
           best: BestWeights) -> None:  # fmt: skip
    """The optimizer steps from `run.step` to `run.max_steps`."""
    acc, cfg, precision = ctx.acc, ctx.cfg, ctx.precision
    order = replace(cfg, seed=ctx.order_seed)
    losses: list[float] = []
    # part i of n of one schedule also continues its data: round i of a federation trains on the
    # batches after round i-1's, not on the same first ones again
    start = run.step + cfg.schedule_part[0] * run.max_steps
    for epoch, micro, batch in _micro_batches(data, order, acc, start, per_epoch, ctx.pad_id):
        if run.step >= run.max_steps:
            break
        with acc.accumulate(model):
            with precision.autocast():
                loss = ctx.loss_fn(model, batch)
            acc.backward(precision.scaled(loss))
            if acc.sync_gradients and cfg.max_grad_norm > 0 and cfg.dp is None:
                precision.unscale(optimizer)
                acc.clip_grad_norm_(ctx.trainable, cfg.max_grad_norm)
            precision.step(optimizer, acc.sync_gradients)
            optimizer.zero_grad(set_to_none=True)
        run.tokens += int(batch["attention_mask"].sum()) * acc.num_processes
        losses.append(float(loss.detach()))
        if (micro + 1) % cfg.grad_accum:
            continue
        scheduler.step()
        run.step += 1
        step_loss = float(acc.reduce(torch.tensor(sum(losses) / len(losses), device=acc.device), "mean"))  # fmt: skip
        losses = []
        _after_step(ctx, run, step_loss, model, optimizer, scheduler, best)
        if ctx.on_step and acc.is_main_process:
            ctx.on_step(run.info(epoch, scheduler.get_last_lr()[0]))


def _resume(acc: Accelerator, checkpoint_dir: Path | None, resume: bool, run_key: dict, keep_best: bool,
            model, optimizer, scheduler) -> tuple[int, BestWeights]:  # fmt: skip
    """Claim the checkpoint folder, restore a checkpoint of this run (or refuse another's): the step
    to start from and the best weights so far."""
    if checkpoint_dir is not None:
        with acc.main_process_first():  # one process claims the folder; the others find it ours
            claim_checkpoint_dir(checkpoint_dir)
    step = _restore_or_refuse(checkpoint_dir, resume, run_key, model, optimizer, scheduler)
    return step, BestWeights(checkpoint_dir if keep_best else None, run_key, resume)


def _loss_and_checkpointing(model, cfg: TrainConfig) -> LossFn:
    """The loss `cfg` asks for (DP-SGD: the model's own, through opacus's wrapper), and
    activation checkpointing switched on if asked."""
    if cfg.gradient_checkpointing:
        causal_lm_of(model).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    if cfg.dp is not None or not cfg.loss_chunk_tokens:
        return lm_loss
    return chunked_lm_loss(cfg.loss_chunk_tokens)


def _privately(model, optimizer, cfg: TrainConfig, n_examples: int, acc: Accelerator, steps: int):
    """DP-SGD for one process: (model with per-sample gradients, DP optimizer, (noise, sample rate))."""
    if acc.num_processes > 1 or cfg.grad_accum > 1:
        raise OffsiteError(
            "`dp` trains in one process without `grad_accum` (the accounting assumes it)"
        )
    sample_rate = min(1.0, cfg.batch_size / n_examples)
    wrapped, dp_optimizer, noise = privatize(
        model, optimizer, cfg.dp, cfg.batch_size, sample_rate, steps
    )
    return wrapped, dp_optimizer, (noise, sample_rate)


def _summary(run: _Progress, cfg: TrainConfig, train_data: TokenData, val_data: TokenData | None,
             best: BestWeights | None, processes: int, per_epoch: int) -> dict:  # fmt: skip
    return {
        "steps": run.step,
        "max_steps": run.max_steps,
        "steps_per_epoch": per_epoch,
        "train_examples": len(train_data),
        "val_examples": len(val_data) if val_data is not None else 0,
        "final_loss": run.history[-1]["loss"] if run.history else None,
        "val_perplexity": run.val_ppl,
        "best_step": best.step if best else None,
        "best_val_perplexity": best.perplexity if best and best.state is not None else None,
        "tokens_this_run": run.tokens,
        "seconds_this_run": round(time.perf_counter() - run.t0, 3),
        "processes": processes,
        "data_sha256": train_data.sha256,
        "config": asdict(cfg),
        "history": run.history,
    }
