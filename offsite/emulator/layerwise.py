"""Layer-wise distillation: each kept middle block learns the span of full-model blocks it stands for.

The middle is cut into spans, one per kept block: span j runs from s_j to s_{j+1} - 1, where s_0
is the first middle block and s_j (j > 0) is the j-th kept block, so each kept block also stands
for the dropped blocks after it (and the first for those before it). One no-grad pass of the full
model over the owner's sample caches, per span, the hidden state entering it and the one leaving
it; each kept block is then trained alone, on those cached states, to map one to the other:

    loss = mean over tokens of |block(x) - y|^2 / mean(y^2)      (relative squared error)

Much cheaper per step than end-to-end distillation (one block forward and backward, no LM head,
no teacher pass), and it aims at what the adapter learns from: the hidden states the top adapter
receives and, through each block's Jacobian, the gradients the bottom adapter receives.

Memory: the fit walks the middle span by span. One pass of the full model records how it calls
each block and the state entering the middle; the full model's state is then carried up one span
at a time (the span's output is the next span's input), beside the emulator's own chain, so the
sample's states are held about three times over whatever the depth (gradient matching, which
needs every span's gradients from one backward pass, also keeps those).

Inputs: `teacher` trains every block on the full model's own hidden state entering its span
(local: the block imitates the span as a function); `emulator` feeds each block what the already
distilled blocks below it produce (the emulator's own chain), so each block also corrects the
error accumulated beneath it. `noise` adds Gaussian noise of that relative size to the inputs
to what the block sees and the same perturbation to the full model's state entering the span; the
target is then the span's answer to the perturbed state, so the block also imitates how the span
responds around the data (its Jacobian: what a changed bottom adapter meets, and what carries
the bottom adapter's gradient).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from offsite.emulator.build import build_emulator
from offsite.emulator.plan import SplitPlan
from offsite.errors import OffsiteError
from offsite.models.architectures import get_blocks, hidden_of
from offsite.models.modes import eval_mode
from offsite.training.data import TokenData, collate

INPUTS = ("teacher", "emulator")
_NOT_PASSED = (
    "hidden_states",
    "past_key_values",
    "past_key_value",
    "layer_past",
)  # when re-calling a block


@dataclass(frozen=True)
class LayerwiseConfig:
    """Steps and step size per kept block, the sample it learns from, and how inputs are chosen."""

    steps: int = 60
    learning_rate: float = 3e-4
    batch_size: int = 4
    max_sequences: int = 64
    inputs: str = "emulator"
    noise: float = 0.0
    grad_weight: float = 0.0  # also match the LM-loss gradient each span passes down (its VJP)
    seed: int = 0
    # keep the fitted blocks only if their transfer score beats the plain drop's (recipe.py); False
    # keeps them always (the score, on 8 sequences, has judged the plug-in wrongly: utility.md)
    gate: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.max_sequences < 1:
            raise OffsiteError("`steps`, `batch_size` and `max_sequences` must be at least 1")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise OffsiteError(
                f"`learning_rate` must be a positive number (got {self.learning_rate})"
            )
        if self.inputs not in INPUTS:
            raise OffsiteError(
                f"`inputs` {self.inputs!r} unknown; choose one of {', '.join(INPUTS)}"
            )
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise OffsiteError(f"`noise` must be >= 0 (got {self.noise})")
        if not (math.isfinite(self.grad_weight) and self.grad_weight >= 0):
            raise OffsiteError(f"`grad_weight` must be >= 0 (got {self.grad_weight})")


def spans(plan: SplitPlan) -> list[tuple[int, int, int]]:
    """(kept block, first, last + 1) of the full-model blocks each kept block stands for."""
    middle, kept = list(plan.middle), list(plan.kept)
    if not kept:
        raise OffsiteError("the emulator keeps no middle block; nothing to distil")
    starts = [middle[0], *kept[1:]]
    ends = [*kept[1:], middle[-1] + 1]
    return list(zip(kept, starts, ends, strict=True))


@dataclass
class BlockCall:
    """How the model called one block on one batch: positional and keyword arguments."""

    args: tuple
    kwargs: dict

    @classmethod
    def of(cls, args: tuple, kwargs: dict) -> BlockCall:
        """The call as a forward pre-hook sees it, without the state and cache arguments (a state
        passed positionally leaves a None in its place: `run` puts the state it is given there, and
        a call kept per block and batch must not hold every block's input)."""
        kept = (None, *args[1:]) if args else ()
        return cls(kept, {k: v for k, v in kwargs.items() if k not in _NOT_PASSED})

    def run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The block on `x`, every floating input (state, rotary tables, masks) in the block's dtype."""
        dtype = next(block.parameters()).dtype
        args, kwargs = _cast((x, *self.args[1:]), dtype), _cast(self.kwargs, dtype)
        if self.args:
            return hidden_of(block(*args, **kwargs))
        return hidden_of(block(**{**kwargs, "hidden_states": args[0]}))


def _cast(value, dtype: torch.dtype):
    """`value` with its floating tensors (also inside tuples, lists and dicts) in `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_spans(
    full: PreTrainedModel,
    data: TokenData,
    batch_size: int,
    table: list[tuple[int, int, int]],
    grads: bool,
):
    """Per batch: the state entering the first span (`in`), every span block's call (`call`) and,
    with `grads`, the LM-loss gradients entering and leaving each span (`gin`, `gout`)."""
    starts, ends = {s for _, s, _ in table}, {e - 1 for _, _, e in table}
    wanted = {i for _, s, e in table for i in range(s, e)}
    first = min(starts)
    blocks = get_blocks(full)
    batches, current = [], {}

    def keep_grad(kind, i, x):
        if grads and x.requires_grad:
            x.register_hook(lambda g: current.setdefault(kind, {}).__setitem__(i, g.detach()))

    def pre(i):
        def fn(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            if i == first:
                current["in"] = x.detach()
                if grads:  # the graph starts here: nothing below needs a gradient
                    x = x.detach().requires_grad_(True)
                    args, kwargs = (
                        ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})
                    )
            if i in starts:
                keep_grad("gin", i, x)
            current.setdefault("call", {})[i] = BlockCall.of(args, kwargs)
            return args, kwargs

        return fn

    def post(i):
        def fn(module, args, output):
            keep_grad("gout", i, hidden_of(output))

        return fn

    handles = [blocks[i].register_forward_pre_hook(pre(i), with_kwargs=True) for i in wanted]
    handles += [blocks[i].register_forward_hook(post(i)) for i in ends if grads]
    saved = {p: p.requires_grad for p in full.parameters()}
    full.requires_grad_(False)
    try:
        with eval_mode(full), torch.set_grad_enabled(grads):
            for start in range(0, len(data), batch_size):
                current = {}
                out = full(**collate(data.examples[start : start + batch_size], 0), use_cache=False)
                if grads:
                    out.loss.backward()
                batches.append(current)
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved.items():
            p.requires_grad_(flag)
    return batches


@torch.no_grad()
def through(blocks: list[tuple[nn.Module, list[BlockCall]]], states: list[torch.Tensor]) -> list[torch.Tensor]:  # fmt: skip
    """The states, batch by batch, through each (block, its call per batch) in turn."""
    for block, calls in blocks:
        states = [calls[j].run(block, x) for j, x in enumerate(states)]
    return states


def relative_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (
        (out.float() - target.float()).pow(2).mean(-1)
        / target.float().pow(2).mean(-1).clamp_min(1e-12)
    ).mean()


def cosine_adamw(params, learning_rate: float, steps: int):
    """AdamW without weight decay and a cosine decay to zero over `steps`: how a block is fitted."""
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps))
    )


def first_and_last(losses: list[float]) -> tuple[float, float]:
    """The mean loss of a fit's first and last few steps (a quarter of them, at most 5)."""
    k = max(1, min(5, len(losses) // 4))
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def _nudged(noise: float, x, teacher_input, span_blocks, i: int, gen) -> tuple:
    """One perturbation, applied to what the block sees and to what the span sees: the block must
    answer a nudged input as the span answers the same nudge (its Jacobian). (input, target)"""
    delta = (
        noise
        * teacher_input.pow(2).mean(-1, keepdim=True).sqrt()
        * torch.randn(x.shape, generator=gen)
    )
    (target,) = through([(b, [call[i]]) for b, call in span_blocks], [teacher_input + delta])
    return x + delta, target


def fit_block(
    block,
    span_blocks,
    inputs,
    teacher_inputs,
    calls,
    targets,
    cfg: LayerwiseConfig,
    gen,
    grads=None,
) -> tuple[float, float]:
    """Fit `block` to the span on the cached batches; returns the mean loss of the first and last steps.

    A block stored in 16 bits is fitted through a float32 copy (most AdamW updates are below
    bfloat16's resolution), then written back in its own dtype."""
    stored = block
    if next(block.parameters()).dtype != torch.float32:
        block = copy.deepcopy(block).float()
    block.train()
    block.requires_grad_(True)
    opt, sched = cosine_adamw(block.parameters(), cfg.learning_rate, cfg.steps)
    losses = []
    for step in range(cfg.steps):
        i = step % len(inputs)
        x, target = inputs[i], targets[i]
        if cfg.noise:
            x, target = _nudged(cfg.noise, x, teacher_inputs[i], span_blocks, i, gen)
        if grads is None:
            loss = relative_error(calls[i].run(block, x), target)
        else:  # and the gradient it passes down: what the bottom adapter receives
            x = x.detach().requires_grad_(True)
            out = calls[i].run(block, x)
            g_in, g_out = grads[i]
            (g,) = torch.autograd.grad(out, x, grad_outputs=g_out, create_graph=True)
            loss = relative_error(out, target) + cfg.grad_weight * relative_error(g, g_in)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(block.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    block.requires_grad_(False)
    block.eval()
    if block is not stored:
        stored.load_state_dict(block.state_dict())  # cast back
    return first_and_last(losses)


@torch.no_grad()
def advance_chain(block, calls, chain, targets) -> tuple[list[torch.Tensor], dict]:
    """The emulator's chain through the fitted `block`, and its error against the span's output."""
    chain = [calls[i].run(block, x) for i, x in enumerate(chain)]
    error = sum(float(relative_error(c, t)) for c, t in zip(chain, targets, strict=True))
    return chain, {"chain_error": round(error / len(chain), 5)}


def distill_layerwise(
    full: PreTrainedModel,
    plan: SplitPlan,
    data: TokenData,
    cfg: LayerwiseConfig,
    *,
    on_block: Callable[[int, int], None] | None = None,
) -> tuple[PreTrainedModel, dict]:
    """An emulator for `plan` whose kept blocks were each fitted to their span; `full` is unchanged."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    sample = TokenData(data.examples[: cfg.max_sequences], data.source, data.sha256, data.mode)
    table = spans(plan)
    grads = cfg.grad_weight > 0
    emulator = build_emulator(full, plan)
    emulator.requires_grad_(False)
    order, full_blocks, emu_blocks = (
        list(plan.emulator_order),
        get_blocks(full),
        get_blocks(emulator),
    )
    # masks captured for the kernel that trains, and the full model's spans run with that kernel
    with _eager_attention(full, grads), _eager_attention(emulator, grads):
        cache = capture_spans(full, sample, cfg.batch_size, table, grads=grads)
        report = _fit_spans(table, cache, order, full_blocks, emu_blocks, cfg, gen, on_block)
    emulator.eval()
    record = {"method": "layerwise", "steps_per_block": cfg.steps, "learning_rate": cfg.learning_rate,
              "batch_size": cfg.batch_size, "sequences": len(sample), "inputs": cfg.inputs, "noise": cfg.noise,
              "grad_weight": cfg.grad_weight, "data_sha256": data.sha256, "seconds": round(time.perf_counter() - t0, 1),
              "spans": report}  # fmt: skip
    return emulator, record


@contextlib.contextmanager
def _eager_attention(model: PreTrainedModel, needed: bool) -> Iterator[None]:
    """Attention's eager kernel for the block: matching gradients differentiates through a backward
    pass, which CPU's fused attention kernels do not support."""
    original = model.config._attn_implementation
    if needed and original != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if model.config._attn_implementation != original:
            model.set_attn_implementation(original)


def _fit_spans(
    table, cache, order, full_blocks, emu_blocks, cfg: LayerwiseConfig, gen, on_block
) -> list[dict]:
    """Fit each kept block to its span in turn: `teacher` carries the full model's state up span by
    span, `chain` what the fitted blocks produce."""
    report = []
    teacher = [b.pop("in") for b in cache]  # what enters the first span (the cache lets go of it)
    chain = teacher
    for n, (k, s, e) in enumerate(table):
        block = emu_blocks[order.index(k)]
        calls = [b["call"][k] for b in cache]
        span_blocks = [(full_blocks[i], [b["call"][i] for b in cache]) for i in range(s, e)]
        targets = through(span_blocks, teacher)
        trivial = e - s == 1 and cfg.inputs == "teacher" and not cfg.noise  # nothing dropped here
        first, last = (
            (0.0, 0.0)
            if trivial
            else fit_block(
                block,
                span_blocks,
                teacher if cfg.inputs == "teacher" else chain,
                teacher,
                calls,
                targets,
                cfg,
                gen,
                [(b["gin"][s], b["gout"][e - 1]) for b in cache] if cfg.grad_weight else None,
            )
        )
        chain, row = advance_chain(block, calls, chain, targets)
        teacher = targets
        report.append({"block": k, "span": [s, e - 1], "loss_first": round(first, 5), "loss_last": round(last, 5), **row})  # fmt: skip
        if on_block:
            on_block(n + 1, len(table))
    return report
