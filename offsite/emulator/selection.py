"""Which middle blocks the emulator keeps: uniform (paper), by redundancy, by similarity clusters.

Block statistics are measured on sample text with forward hooks on the block list:
* redundancy score of block i = 1 - cosine(input, output), averaged over tokens: how much the
  block changes its input (a low score means the block is nearly an identity and cheap to drop);
* similarity of blocks i and j = mean cosine of their outputs (CRaSh, Zhang et al., EMNLP 2023:
  neighbouring blocks whose representations agree form a cluster, one block represents it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from offsite.emulator.plan import SplitPlan
from offsite.errors import OffsiteError
from offsite.models.architectures import get_blocks, hidden_of
from offsite.models.modes import eval_mode
from offsite.training.data import TokenData, collate

RULES = ("uniform", "redundancy", "similarity")  # chosen by name; "explicit" takes indices
STRATEGIES = (*RULES, "explicit")


@dataclass(frozen=True)
class BlockStats:
    """Per-block redundancy scores and the pairwise output-similarity matrix (full-model indices)."""

    redundancy: list[float]
    similarity: list[list[float]]


@torch.no_grad()
def block_stats(
    model: PreTrainedModel, data: TokenData, *, batch_size: int = 4, max_sequences: int = 32
) -> BlockStats:
    """Measure redundancy and output similarity of every block on up to `max_sequences` sequences."""
    blocks = get_blocks(model)
    n = len(blocks)
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(index):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            captured[index] = (x.detach().float(), hidden_of(output).detach().float())

        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    redundancy = torch.zeros(n, dtype=torch.float64)
    similarity = torch.zeros(n, n, dtype=torch.float64)
    tokens = 0
    with eval_mode(model):
        try:
            examples = data.examples[:max_sequences]
            for start in range(0, len(examples), batch_size):
                batch = collate(examples[start : start + batch_size], 0)
                captured.clear()
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                mask = batch["attention_mask"].bool()
                outs = torch.stack(
                    [F.normalize(captured[i][1][mask], dim=-1) for i in range(n)]
                )  # n, T, d
                for i in range(n):
                    x, y = captured[i][0][mask], captured[i][1][mask]
                    redundancy[i] += (1 - F.cosine_similarity(x, y, dim=-1)).sum().double()
                similarity += torch.einsum("itd,jtd->ij", outs, outs).double()
                tokens += int(mask.sum())
        finally:
            for h in handles:
                h.remove()
    if tokens == 0:
        raise OffsiteError("no tokens to measure block statistics on; give more selection data")
    return BlockStats((redundancy / tokens).tolist(), (similarity / tokens).tolist())


def keep_least_redundant(middle: list[int], k: int, stats: BlockStats) -> list[int]:
    """The k middle blocks that change their input most (drop the most redundant ones)."""
    ranked = sorted(middle, key=lambda i: stats.redundancy[i], reverse=True)
    return sorted(ranked[:k])


def contiguous_clusters(middle: list[int], k: int, stats: BlockStats) -> list[list[int]]:
    """Split the middle into k runs of neighbouring blocks maximising within-run output similarity."""
    m = len(middle)
    sim = [[stats.similarity[a][b] for b in middle] for a in middle]

    def cohesion(
        i: int, j: int
    ) -> float:  # mean pairwise similarity of middle[i..j], times its size
        size = j - i + 1
        if size == 1:
            return 1.0
        total = sum(sim[a][b] for a in range(i, j + 1) for b in range(i, j + 1) if a != b)
        return total / (size - 1)

    best = [[float("-inf")] * (k + 1) for _ in range(m + 1)]
    cut = [[0] * (k + 1) for _ in range(m + 1)]
    best[0][0] = 0.0
    for end in range(1, m + 1):
        for parts in range(1, min(k, end) + 1):
            for start in range(parts - 1, end):
                value = best[start][parts - 1] + cohesion(start, end - 1)
                if value > best[end][parts]:
                    best[end][parts], cut[end][parts] = value, start
    clusters, end = [], m
    for parts in range(k, 0, -1):
        start = cut[end][parts]
        clusters.append(middle[start:end])
        end = start
    return clusters[::-1]


def keep_cluster_representatives(middle: list[int], k: int, stats: BlockStats) -> list[int]:
    """CRaSh-style: k contiguous similarity clusters, each represented by its least redundant block."""
    return sorted(
        max(c, key=lambda i: stats.redundancy[i]) for c in contiguous_clusters(middle, k, stats)
    )


def select_plan(plan: SplitPlan, strategy: str, stats: BlockStats | None) -> SplitPlan:
    """Re-choose `plan.kept` (same size) with `strategy`; uniform and explicit need no statistics."""
    if strategy not in STRATEGIES:
        raise OffsiteError(
            f"`selection` {strategy!r} unknown; choose one of {', '.join(STRATEGIES)}"
        )
    if strategy in ("uniform", "explicit"):
        return plan
    if stats is None:
        raise OffsiteError(
            f"`selection` {strategy} needs sample text to measure blocks on (`selection_data`)"
        )
    middle, k = list(plan.middle), len(plan.kept)
    pick = keep_least_redundant if strategy == "redundancy" else keep_cluster_representatives
    return SplitPlan(plan.num_layers, plan.adapter, tuple(pick(middle, k, stats)), strategy)


def select_recorded(plan: SplitPlan, rule: str, stats, record: dict) -> SplitPlan:
    """`plan` with its middle chosen by `rule` from `stats`; `record['selection']` gets the
    per-block redundancy scores and the choice (what the bundle manifest records)."""
    plan = select_plan(plan, rule, stats)
    record["selection"]["redundancy"] = [round(x, 5) for x in stats.redundancy]
    record["selection"].update(strategy=plan.strategy, kept=list(plan.kept))
    return plan
