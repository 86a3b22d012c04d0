"""A public corpus sampled from the owner's own model, for selection and distillation.

An owner without a suitable public text can distil the emulator on text the full model writes
itself (data-free distillation, as in LLM-QAT): sampled from the model's own distribution, it
covers whatever the model knows instead of one corpus's domain, and it reveals nothing the owner
would not ship anyway.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from offsite.atomic import write_bytes_atomic
from offsite.errors import OffsiteError
from offsite.models.modes import eval_mode


@dataclass(frozen=True)
class SampleConfig:
    documents: int = 256
    tokens: int = 256  # new tokens per document
    batch_size: int = 32
    temperature: float = 1.0
    top_k: int = 50  # 0: no top-k cut
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("documents", "tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise OffsiteError(f"`{name}` must be >= 1")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise OffsiteError(
                f"`temperature` must be a finite number > 0 (got {self.temperature})"
            )
        if self.top_k < 0:
            raise OffsiteError("`top_k` must be >= 0 (0: no top-k cut)")
        if not 0 < self.top_p <= 1:
            raise OffsiteError("`top_p` must be in (0, 1]")
        if not 0 <= self.seed < 2**63:
            raise OffsiteError(
                f"`seed` must be a whole number from 0 to 2**63 - 1 (got {self.seed})"
            )


def document_start(tokenizer) -> int:
    """The token a document starts from: BOS where the tokenizer prepends one, else EOS (GPT-style
    tokenizers separate documents with it)."""
    probe = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None and probe and probe[0] == bos:
        return bos
    start = eos if eos is not None else bos
    if start is None:
        raise OffsiteError(
            "the tokenizer has neither a BOS nor an EOS token to start documents from"
        )
    return start


@torch.no_grad()
def sample_corpus(
    model: PreTrainedModel,
    tokenizer,
    cfg: SampleConfig = SampleConfig(),
    *,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[str]:
    """`cfg.documents` documents of up to `cfg.tokens` tokens sampled from `model` (seeded)."""
    start = document_start(tokenizer)
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    docs: list[str] = []
    with torch.random.fork_rng(), eval_mode(model):  # the caller's random state is left alone
        torch.manual_seed(cfg.seed)
        while len(docs) < cfg.documents:
            n = min(cfg.batch_size, cfg.documents - len(docs))
            ids = torch.full((n, 1), start, dtype=torch.long, device=device)
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=cfg.temperature,
                top_p=cfg.top_p, top_k=cfg.top_k, max_new_tokens=cfg.tokens, pad_token_id=eos if eos is not None else start,
            )  # fmt: skip
            for row in out[:, 1:].tolist():
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                text = tokenizer.decode(row, skip_special_tokens=True).strip()
                docs.append(text)
            if on_batch is not None:
                on_batch(len(docs), cfg.documents)
    return [d for d in docs if d]


def write_corpus(path: str | Path, docs: list[str]) -> Path:
    """Documents separated by blank lines, written atomically."""
    path = Path(path)
    if not docs:
        raise OffsiteError(f"{path}: no text was sampled; raise `tokens` or `documents`")
    write_bytes_atomic(path, ("\n\n".join(docs) + "\n").encode())
    return path
