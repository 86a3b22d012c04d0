"""`owner sample-corpus`: a public corpus sampled from the owner's own model, for selection and
distillation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from offsite.emulator.corpus import SampleConfig, sample_corpus, write_corpus
from offsite.errors import OffsiteError
from offsite.models.loading import DEFAULT_MODEL, load_model, load_tokenizer


def sample_public_corpus(
    out: Path,
    cfg: SampleConfig | None = None,
    model: str = DEFAULT_MODEL,
    dtype: torch.dtype | None = None,
    *,
    overwrite: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict:
    """`cfg.documents` documents written to the text file `out` (checked before the model loads)."""
    cfg = cfg or SampleConfig()
    if out.is_dir():
        raise OffsiteError(f"{out}: is a directory; `out` is a file path")
    if out.exists() and not overwrite:
        raise OffsiteError(f"{out}: already exists; choose another `out` or pass `overwrite`")
    if not out.parent.is_dir():
        raise OffsiteError(f"{out.parent}: no such directory for `out`")
    loaded = load_model(model, dtype=dtype)
    docs = sample_corpus(loaded, load_tokenizer(model), cfg, on_batch=on_batch)
    write_corpus(out, docs)
    return {
        "corpus": str(out),
        "documents": len(docs),
        "bytes": out.stat().st_size,
        "model": model,
        "seed": cfg.seed,
    }
