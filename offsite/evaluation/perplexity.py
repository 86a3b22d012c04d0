"""Perplexity: exp of the mean next-token negative log-likelihood over every labelled token."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from offsite.errors import OffsiteError
from offsite.models.modes import eval_mode
from offsite.training.data import TokenData, collate, load_data, pad_id_of
from offsite.training.loss import CHUNK_TOKENS, batch_nll


@torch.no_grad()
def perplexity(
    model: nn.Module,
    data: TokenData,
    *,
    batch_size: int = 4,
    pad_id: int = 0,
    device: torch.device | str | None = None,
    on_batch: Callable[[int], None] | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
) -> dict[str, float | int]:
    """Perplexity of `model` on `data`, as a JSON-ready dict; the head is applied `chunk_tokens`
    positions at a time (0: the whole batch's logits at once)."""
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(data), batch_size):
            batch = collate(data.examples[start : start + batch_size], pad_id)
            nll, n = batch_nll(model, {k: v.to(device) for k, v in batch.items()}, chunk_tokens)
            total += float(nll)
            count += int(n)
            if on_batch:
                on_batch(len(batch["input_ids"]))
    if count == 0:
        raise OffsiteError(f"{data.source}: no tokens to score (too little text for one sequence?)")
    mean = total / count
    return {
        "perplexity": math.exp(mean),
        "nll_per_token": mean,
        "tokens": count,
        "sequences": len(data),
    }


def check_eval_options(block_size: int, batch_size: int, max_sequences: int | None) -> None:
    """Refuse sizes below 1 (a count of 0 sequences would report perplexity 1.0)."""
    sizes = (
        ("`block_size`", block_size),
        ("`batch_size`", batch_size),
        ("`max_sequences`", max_sequences),
    )
    for flag, value in sizes:
        if value is not None and value < 1:
            raise OffsiteError(f"{flag} must be >= 1 (got {value})")


def perplexity_on_file(
    model: nn.Module,
    tokenizer,
    path,
    *,
    block_size: int = 512,
    batch_size: int = 4,
    max_sequences: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """Perplexity on a .txt/.jsonl file (same tokenisation and packing as training)."""
    check_eval_options(block_size, batch_size, max_sequences)
    data = load_data(path, tokenizer, block_size)
    if max_sequences is not None:
        data = TokenData(data.examples[:max_sequences], data.source, data.sha256, data.mode)
    result = perplexity(
        model, data, batch_size=batch_size, pad_id=pad_id_of(tokenizer), on_batch=on_batch
    )
    return {**result, "data": str(path), "block_size": block_size}
