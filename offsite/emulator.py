"""Emulator construction: the full model with some middle blocks dropped, everything else kept."""

from __future__ import annotations

import copy

from transformers import PreTrainedModel

from offsite.architectures import num_blocks, set_blocks
from offsite.errors import OffsiteError
from offsite.split import SplitPlan


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

    With `inplace=False` the full model is left untouched (its weights are copied).
    """
    check_plan_fits(model, plan)
    emulator = model if inplace else copy.deepcopy(model)
    set_blocks(emulator, list(plan.emulator_order))
    return emulator
