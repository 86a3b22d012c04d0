"""A transfer score the owner computes alone: do the adapter's gradients through the emulator point
where they would through the full model?

For each adapter block: the cosine similarity between the gradient of the LM loss with respect to
that block's weights when the block sits in the emulator and when it sits in the full model, on
the owner's own sample text. 1 means the data owner's updates would be the full model's updates
(nothing dropped gives exactly 1); near 0 means what the adapter learns through the emulator says
little about what helps the full model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from offsite.emulator.plan import SplitPlan
from offsite.models.architectures import get_blocks
from offsite.models.modes import eval_mode
from offsite.training.data import TokenData, collate


def _block_grads(
    model: PreTrainedModel, positions: list[int], data: TokenData, batch_size: int, pad_id: int
) -> dict[int, torch.Tensor]:
    """Flattened LM-loss gradient of each block at `positions`, summed over `data`."""
    blocks = get_blocks(model)
    saved = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    params = {i: list(blocks[i].parameters()) for i in positions}
    for ps in params.values():
        for p in ps:
            p.requires_grad_(True)
            p.grad = None
    try:
        with eval_mode(model):
            for start in range(0, len(data), batch_size):
                batch = collate(data.examples[start : start + batch_size], pad_id)
                model(**batch).loss.backward()
        return {i: torch.cat([p.grad.flatten() for p in ps]) for i, ps in params.items()}
    finally:
        for p, flag in saved.items():
            p.grad = None
            p.requires_grad_(flag)


def transfer_score(
    full: PreTrainedModel,
    emulator: PreTrainedModel,
    plan: SplitPlan,
    data: TokenData,
    *,
    batch_size: int = 4,
    pad_id: int = 0,
) -> dict[str, float]:
    """Per adapter block (full-model index as a string): cosine of the two gradients, and their mean."""
    order = list(plan.emulator_order)
    g_full = _block_grads(full, list(plan.adapter), data, batch_size, pad_id)
    g_emu = _block_grads(emulator, [order.index(a) for a in plan.adapter], data, batch_size, pad_id)
    scores = {
        str(a): round(float(F.cosine_similarity(g_full[a], g_emu[order.index(a)], dim=0)), 4)
        for a in plan.adapter
    }
    return {**scores, "mean": round(sum(scores.values()) / len(scores), 4)}
