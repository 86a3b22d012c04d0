"""Harmonizers: a small trained stand-in in place of each run of dropped blocks (after ScaleOT).

Today's layer-wise recipe refits each kept block to stand for the dropped blocks after it. This
kind of emulator leaves every kept block exactly as the full model has it and puts, where each run
of consecutive dropped middle blocks was, one stand-in block: a block of the model's own
architecture whose attention is silenced (its output projection zero) and whose MLP has only
`rank` hidden units (the rest of its matrices zero), so it computes

    h + W_out[:, :r] act(W_in[:r] norm(h))                              (a low-rank residual MLP)

It starts as the identity (W_out = 0) and is fitted, run by run from the bottom up, on the
emulator's own chain: its input is what the emulator below it produces on the owner's sample, its
target the full model's state after the run (relative squared error, as `layerwise.py`).

The emulator stays a plain Hugging Face model of the same family (one more block per run), so the
data owner loads and trains it as any other. A stand-in holds none of the dropped blocks' weights:
it starts as a copy of the emulator block below it (already in the bundle), then its attention
output and MLP are overwritten. The manifest names the stand-ins (`emulator_recipe.harmonizer`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from offsite.emulator.build import build_emulator
from offsite.emulator.layerwise import (
    advance_chain,
    capture_spans,
    cosine_adamw,
    first_and_last,
    relative_error,
    through,
)
from offsite.emulator.plan import SplitPlan
from offsite.errors import OffsiteError
from offsite.models.architectures import arch_spec, get_blocks
from offsite.training.data import TokenData


@dataclass(frozen=True)
class HarmonizerConfig:
    """Each stand-in's hidden units, and how it is fitted (steps, step size, sample)."""

    rank: int = 64
    # measured on SmolLM2's default split (the error at the top of the chain, 5 stand-ins):
    # 120 steps at 1e-3 0.303, 300 at 3e-3 0.180, 600 at 3e-3 0.161; rank 256 0.129 (layer-wise 0.153)
    steps: int = 300
    learning_rate: float = 3e-3
    batch_size: int = 4
    max_sequences: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rank", "steps", "batch_size", "max_sequences"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OffsiteError(f"`{name}` must be a whole number >= 1 (got {value})")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise OffsiteError(
                f"`learning_rate` must be a positive number (got {self.learning_rate})"
            )


def dropped_runs(plan: SplitPlan) -> list[tuple[int, int]]:
    """[first, last + 1) of each run of consecutive dropped middle blocks."""
    runs: list[tuple[int, int]] = []
    for i in plan.dropped:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def harmonized_plan(plan: SplitPlan) -> SplitPlan:
    """The plan with a block at the first position of each dropped run (its stand-in)."""
    kept = tuple(sorted(set(plan.kept) | {a for a, _ in dropped_runs(plan)}))
    return SplitPlan(plan.num_layers, plan.adapter, kept, plan.strategy)


def _axes(module: nn.Module, matmuls: dict[str, int]) -> int:
    """The output axis of `module`'s weight (a subclass of a registered matmul class counts)."""
    for cls in type(module).__mro__:
        if cls.__name__ in matmuls:
            return matmuls[cls.__name__]
    raise OffsiteError(f"{type(module).__name__} is not a matmul module the registry knows")


def make_stand_in(block: nn.Module, below: nn.Module, model_type: str, rank: int) -> list:
    """Turn `block` into a stand-in (from a copy of `below`): attention silenced, an MLP of `rank`
    hidden units that outputs zero. Returns its trainable (parameter, mask or None) pairs."""
    spec = arch_spec(model_type)
    layout, matmuls = spec.mlp, spec.matmuls
    block.load_state_dict(below.state_dict())  # nothing of the dropped block is left
    trainable = []
    with torch.no_grad():
        for name in layout.attention_out:
            for p in block.get_submodule(name).parameters():
                p.zero_()
        for name in layout.mlp_in:
            module = block.get_submodule(name)
            out_axis = _axes(module, matmuls)
            width = module.weight.shape[out_axis] // layout.fused
            if rank > width:
                raise OffsiteError(f"`rank` {rank} is more than the MLP's {width} hidden units")
            keep = (torch.arange(module.weight.shape[out_axis]) % width) < rank
            for p in module.parameters():
                axis = out_axis if p.dim() > 1 else 0
                shape = [1] * p.dim()
                shape[axis] = -1
                mask = keep.view(shape).to(p.dtype)
                p.mul_(mask)
                trainable.append((p, mask))
        for name in layout.mlp_out:
            module = block.get_submodule(name)
            in_axis = 1 - _axes(module, matmuls)
            keep = torch.arange(module.weight.shape[in_axis]) < rank
            for p in module.parameters():
                p.zero_()  # the identity at the start
                if p.dim() > 1:
                    shape = [1, 1]
                    shape[in_axis] = -1
                    trainable.append((p, keep.view(shape).to(p.dtype)))
                else:
                    trainable.append((p, None))
    return trainable


def _fit(
    block: nn.Module, trainable: list, chain, calls, targets, cfg: HarmonizerConfig
) -> tuple[float, float]:
    """Fit the stand-in's masked MLP on the cached batches (in float32 if it is stored in 16 bits);
    the mean loss of the first and last steps."""
    stored, pairs = block, trainable
    if next(block.parameters()).dtype != torch.float32:
        index = {id(p): n for n, p in block.named_parameters()}
        block = copy.deepcopy(block).float()
        named = dict(block.named_parameters())
        pairs = [(named[index[id(p)]], None if m is None else m.float()) for p, m in trainable]
    params = [p for p, _ in pairs]
    block.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt, sched = cosine_adamw(params, cfg.learning_rate, cfg.steps)
    losses = []
    for step in range(cfg.steps):
        i = step % len(chain)
        loss = relative_error(calls[i].run(block, chain[i]), targets[i])
        loss.backward()
        for p, mask in pairs:
            if mask is not None:
                p.grad.mul_(mask)  # the zero hidden units stay zero: a rank-r MLP
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    block.requires_grad_(False)
    if block is not stored:
        stored.load_state_dict(block.state_dict())  # cast back
    return first_and_last(losses)


def fit_harmonizers(
    full: PreTrainedModel, plan: SplitPlan, data: TokenData, cfg: HarmonizerConfig
) -> tuple[PreTrainedModel, SplitPlan, dict]:
    """The emulator with a fitted stand-in for each dropped run, its plan, and the manifest record."""
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    runs = dropped_runs(plan)
    if not runs:
        raise OffsiteError("the plan drops no middle block; there is nothing to stand in for")
    stand_ins = {a: b for a, b in runs}
    table = sorted([(k, k, k + 1) for k in plan.kept] + [(a, a, b) for a, b in runs])
    sample = TokenData(data.examples[: cfg.max_sequences], data.source, data.sha256, data.mode)
    cache = capture_spans(full, sample, cfg.batch_size, table, grads=False)
    final = harmonized_plan(plan)
    emulator = build_emulator(full, final)
    emulator.requires_grad_(False)
    order, blocks, full_blocks = list(final.emulator_order), get_blocks(emulator), get_blocks(full)
    teacher = [b.pop("in") for b in cache]  # what enters the middle (the cache lets go of it)
    chain, report = teacher, []
    for position, start, end in table:
        at = order.index(position)
        calls = [b["call"][position] for b in cache]
        targets = through([(full_blocks[i], [b["call"][i] for b in cache]) for i in range(start, end)], teacher)  # fmt: skip
        teacher = targets  # the full model's state, carried up run by run
        row: dict = {"block": position, "span": [start, end - 1]}
        if position in stand_ins:
            below = blocks[at - 1] if at else blocks[at + 1]  # a block the bundle holds anyway
            trainable = make_stand_in(blocks[at], below, full.config.model_type, cfg.rank)
            first, last = _fit(blocks[at], trainable, chain, calls, targets, cfg)
            row.update(stand_in=True, loss_first=round(first, 5), loss_last=round(last, 5))
        chain, error = advance_chain(blocks[at], calls, chain, targets)
        report.append({**row, **error})
    emulator.eval()
    record = {"method": "harmonizer", "stand_ins": sorted(stand_ins), "stands_for": {str(a): list(range(a, b)) for a, b in runs},
              "rank": cfg.rank, "steps_per_stand_in": cfg.steps, "learning_rate": cfg.learning_rate,
              "sequences": len(sample), "data_sha256": data.sha256, "seconds": round(time.perf_counter() - t0, 1),
              "spans": report}  # fmt: skip
    return emulator, final, record
