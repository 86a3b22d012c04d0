"""Extra emulator compression from the paper's ablations: magnitude pruning and weight quantization.

Both act only on the kept emulator blocks' Linear weights (never the adapter, embeddings or head)
and leave a plain float model, so the bundle still loads with plain transformers.
"""

from __future__ import annotations

import torch
from torch import nn

from offsite.errors import OffsiteError
from offsite.models.architectures import get_blocks


def _linears(model: nn.Module, positions: list[int]):
    blocks = get_blocks(model)
    for i in positions:
        for module in blocks[i].modules():
            if isinstance(module, nn.Linear):
                yield module


@torch.no_grad()
def prune_magnitude(model: nn.Module, positions: list[int], sparsity: float) -> None:
    """Zero the `sparsity` share of smallest-magnitude weights in each Linear of those blocks."""
    if not 0.0 <= sparsity < 1.0:
        raise OffsiteError(f"--prune {sparsity} must be in [0, 1)")
    for linear in _linears(model, positions):
        w = linear.weight
        k = int(w.numel() * sparsity)
        if k:
            threshold = w.abs().flatten().kthvalue(k).values
            w.masked_fill_(w.abs() <= threshold, 0.0)


@torch.no_grad()
def quantize_weights(model: nn.Module, positions: list[int], bits: int) -> None:
    """Round each Linear weight of those blocks to `bits`-bit symmetric integers per output row."""
    if not 2 <= bits <= 16:
        raise OffsiteError(f"--quantize-bits {bits} must be between 2 and 16")
    levels = 2 ** (bits - 1) - 1
    for linear in _linears(model, positions):
        w = linear.weight
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / levels
        w.copy_((w / scale).round().clamp(-levels, levels) * scale)
