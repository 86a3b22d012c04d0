"""Extra emulator compression from the paper's ablations: magnitude pruning and weight quantization.

Both act only on the kept emulator blocks' matmul weights (the registry names their modules) (never the adapter, embeddings or head)
and leave a plain float model, so the bundle still loads with plain transformers.
"""

from __future__ import annotations

import torch
from torch import nn

from offsite.errors import OffsiteError
from offsite.models.architectures import block_matmuls


@torch.no_grad()
def prune_magnitude(model: nn.Module, positions: list[int], sparsity: float) -> None:
    """Zero the `sparsity` share of smallest-magnitude weights in each matmul of those blocks."""
    if not 0.0 <= sparsity < 1.0:
        raise OffsiteError(f"`prune` {sparsity} must be in [0, 1)")
    for module, _ in block_matmuls(model, positions):
        w = module.weight
        k = int(w.numel() * sparsity)
        if k:
            threshold = w.abs().flatten().kthvalue(k).values
            w.masked_fill_(w.abs() <= threshold, 0.0)


@torch.no_grad()
def quantize_weights(model: nn.Module, positions: list[int], bits: int) -> None:
    """Round each matmul weight of those blocks to `bits`-bit symmetric integers per output."""
    if not 2 <= bits <= 16:
        raise OffsiteError(f"`quantize_bits` {bits} must be between 2 and 16")
    levels = 2 ** (bits - 1) - 1
    for module, out_axis in block_matmuls(model, positions):
        w = module.weight
        scale = w.abs().amax(dim=1 - out_axis, keepdim=True).clamp_min(1e-12) / levels
        w.copy_((w / scale).round().clamp(-levels, levels) * scale)
