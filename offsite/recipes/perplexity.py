"""`owner evaluate` and `data-owner evaluate`: perplexity of a model, or of a bundle's emulator
(with an adapter plugged in or not), on a held-out file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from offsite.artefacts.adapter import open_adapter, plug_into_emulator
from offsite.artefacts.bundle import check_bundle_model
from offsite.evaluation.perplexity import check_eval_options, perplexity_on_file
from offsite.models.loading import DEFAULT_MODEL, load_model, load_tokenizer
from offsite.recipes.identity import credentials_of, verified_bundle


@dataclass(frozen=True)
class HeldOut:
    """A held-out file and how it is cut: sequences of `block_size` tokens, `batch_size` per pass."""

    data: Path
    block_size: int = 512
    batch_size: int = 4
    max_sequences: int | None = None  # only the first N

    def __post_init__(self) -> None:
        check_eval_options(self.block_size, self.batch_size, self.max_sequences)

    def score(self, model, tokenizer, on_batch: Callable[[int], None] | None) -> dict:
        return perplexity_on_file(model, tokenizer, self.data, block_size=self.block_size, batch_size=self.batch_size,
                                  max_sequences=self.max_sequences, on_batch=on_batch)  # fmt: skip


def model_perplexity(
    held_out: HeldOut,
    model: str = DEFAULT_MODEL,
    dtype: torch.dtype | None = None,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """`owner evaluate`: the full model's perplexity on `held_out`."""
    loaded = load_model(model, dtype=dtype)
    return {"model": model, **held_out.score(loaded, load_tokenizer(model), on_batch)}


def emulator_perplexity(
    held_out: HeldOut,
    bundle: Path,
    adapter: Path | None = None,
    credentials: Path | None = None,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """`data-owner evaluate`: the bundle's emulator's perplexity, with `adapter` plugged in when
    given; with `credentials` the owner's signature on the bundle is checked too."""
    opened = verified_bundle(bundle, credentials_of(credentials))
    model = opened.load_model(dtype=torch.float32)
    check_bundle_model(opened, model)
    if adapter:
        plug_into_emulator(model, opened, open_adapter(adapter))
    result = held_out.score(model, opened.load_tokenizer(), on_batch)
    return {"bundle": str(opened.path), "adapter": str(adapter) if adapter else None, **result}
