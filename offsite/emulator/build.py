"""Emulator construction: the full model with some middle blocks dropped, everything else kept."""

from __future__ import annotations

import copy

from transformers import PreTrainedModel

from offsite.emulator.plan import SplitPlan
from offsite.errors import OffsiteError
from offsite.models.architectures import get_blocks, num_blocks, set_blocks


def check_plan_fits(model: PreTrainedModel, plan: SplitPlan) -> None:
    """Refuse a plan made for a model of another depth."""
    depth = num_blocks(model.config)
    if depth != plan.num_layers:
        raise OffsiteError(
            f"split plan is for a {plan.num_layers}-block model but this model has {depth} blocks"
        )


def build_emulator(
    model: PreTrainedModel, plan: SplitPlan, inplace: bool = False
) -> PreTrainedModel:
    """Adapter blocks + kept middle blocks (renumbered), with embeddings, norm and head.

    With `inplace=False` the full model is left untouched: its weights are copied, all but the
    dropped blocks' (the copy would be thrown away at once; for a large model it doubles memory).
    """
    check_plan_fits(model, plan)
    if inplace:
        emulator = model
    else:
        kept = set(plan.emulator_order)
        shared = {id(b): b for i, b in enumerate(get_blocks(model)) if i not in kept}
        emulator = copy.deepcopy(model, shared)  # dropped blocks are referenced, not copied...
    set_blocks(emulator, list(plan.emulator_order))  # ...and leave the copy here
    return emulator
