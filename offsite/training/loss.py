"""Losses: the model's own next-token loss, and the summed NLL that perplexity is built from."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from offsite.training.data import IGNORE_INDEX

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]

# positions whose full-vocabulary logits exist at once, in training and scoring alike
# (SmolLM2, 4x256 tokens a step: peak RSS 1.96 GB at 256 against 2.46 GB at 1024)
CHUNK_TOKENS = 256


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own next-token loss (labels shifted inside the model)."""
    return model(**batch).loss


def batch_nll(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL and the number of tokens it covers (labels shifted by one);
    `chunk_tokens` > 0: the head applied that many positions at a time (as the training loss), so
    the full-vocabulary logits of the whole batch never exist at once (a model with no output
    head to apply, or one under DistributedDataParallel, is scored whole)."""
    chunkable = hasattr(causal_lm_of(model), "get_output_embeddings")
    if (
        chunk_tokens > 0
        and chunkable
        and not isinstance(model, nn.parallel.DistributedDataParallel)
    ):
        hidden, _, causal_lm = _final_hidden(model, batch)
        # as below: a soft prompt's positions are not scored
        h, y = _predicted(hidden[:, -batch["input_ids"].shape[1] :], batch["labels"])
        head, cap = _head(causal_lm)
        nll = sum(
            (_chunk_nll(head, h[i : i + chunk_tokens], y[i : i + chunk_tokens], cap)
             for i in range(0, len(y), chunk_tokens)),
            torch.zeros((), device=hidden.device),
        )  # fmt: skip
        return nll, torch.tensor(len(y), device=hidden.device)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, -batch["input_ids"].shape[1] :]  # a soft prompt's positions come first
    targets = batch["labels"][:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return nll, (targets != IGNORE_INDEX).sum()


def chunked_lm_loss(chunk_tokens: int) -> LossFn:
    """Next-token loss computed `chunk_tokens` positions at a time: the full-vocabulary logits of
    the whole batch never exist at once (each chunk's are recomputed in the backward pass).

    Falls back to the model's own loss under DistributedDataParallel, whose gradient sync needs
    the wrapped model's forward."""

    def loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return lm_loss(model, batch)
        hidden, labels, causal_lm = _final_hidden(model, batch)
        h, y = _predicted(hidden, labels)
        if not len(y):
            return hidden.sum() * 0.0
        head, cap = _head(causal_lm)
        total = sum(
            checkpoint(
                _chunk_nll,
                head,
                h[i : i + chunk_tokens],
                y[i : i + chunk_tokens],
                cap,
                use_reentrant=False,
            )  # fmt: skip
            for i in range(0, len(y), chunk_tokens)
        )
        return total / len(y)

    return loss


def _predicted(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's hidden state and the next token it is scored on (unlabelled ones dropped)."""
    h, y = hidden[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    keep = y != IGNORE_INDEX
    return h[keep], y[keep]


def _head(causal_lm: nn.Module) -> tuple[nn.Module, float | None]:
    """The output head and the final logit soft-cap (Gemma 2), if any."""
    return causal_lm.get_output_embeddings(), getattr(
        causal_lm.config, "final_logit_softcapping", None
    )


def _chunk_nll(
    head: nn.Module, h: torch.Tensor, y: torch.Tensor, cap: float | None
) -> torch.Tensor:
    logits = head(h).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, y, reduction="sum")


def _final_hidden(model: nn.Module, batch: dict[str, torch.Tensor]):
    """The last hidden states (after the final norm), the labels aligned with them, and the causal LM.

    A PEFT soft prompt (prompt tuning) is put in front of the embeddings, as peft's forward does."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    causal_lm = causal_lm_of(model)
    config = getattr(model, "active_peft_config", None)
    if config is None or not config.is_prompt_learning:
        out = causal_lm.base_model(input_ids=ids, attention_mask=mask)
        return out.last_hidden_state, labels, causal_lm
    embeds = causal_lm.get_input_embeddings()(ids)
    prompt = model.get_prompt(batch_size=ids.shape[0]).to(embeds.dtype)
    n = prompt.shape[1]
    mask = torch.cat([mask.new_ones(ids.shape[0], n), mask], dim=1)
    labels = torch.cat([labels.new_full((ids.shape[0], n), IGNORE_INDEX), labels], dim=1)
    out = causal_lm.base_model(
        inputs_embeds=torch.cat([prompt, embeds], dim=1), attention_mask=mask
    )
    return out.last_hidden_state, labels, causal_lm


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
