"""The model owner's emulator recipe: choose blocks, optionally distil and compress, then bundle."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedModel

from offsite.emulator.build import build_emulator
from offsite.emulator.compress import prune_magnitude, quantize_weights
from offsite.emulator.distill import DEFAULT_WEIGHT, distill_emulator
from offsite.emulator.harmonizer import HarmonizerConfig, fit_harmonizers
from offsite.emulator.layerwise import LayerwiseConfig, distill_layerwise
from offsite.emulator.plan import SplitPlan
from offsite.emulator.selection import STRATEGIES, block_stats, select_recorded
from offsite.emulator.transfer import transfer_score
from offsite.errors import OffsiteError, spec_fields
from offsite.training.config import StepInfo, TrainConfig
from offsite.training.data import TokenData, load_data, pad_id_of, split_validation

# The owner's default public sample text for block selection: ~110 KB of WikiText-2 (CC BY-SA 3.0).
PUBLIC_SAMPLE = Path(__file__).parent / "resources" / "public-sample.txt"
TRANSFER_SEQUENCES = 8  # sample sequences the transfer score is measured on


@dataclass(frozen=True)
class EmulatorRecipe:
    """How to turn the split plan into an emulator (everything optional but the selection rule)."""

    selection: str = "redundancy"  # measured on SmolLM2: far better than uniform (README)
    selection_data: Path | None = None
    distill_data: Path | None = None
    distill: TrainConfig = field(
        default_factory=lambda: TrainConfig(max_steps=200, learning_rate=1e-4, warmup_steps=20)
    )
    distill_weight: float = DEFAULT_WEIGHT
    # fit each kept block to its span (cheap; measured in the README's transfer study); None: off
    layerwise: LayerwiseConfig | None = field(default_factory=LayerwiseConfig)
    # the other kind: kept blocks as they are, a small fitted stand-in per dropped run (harmonizer.py)
    harmonizer: HarmonizerConfig | None = None
    block_size: int = 256
    val_fraction: float = 0.05
    prune: float = 0.0
    quantize_bits: int | None = None
    checkpoint_dir: Path | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        if self.selection not in STRATEGIES:
            raise OffsiteError(
                f"`selection` {self.selection!r} unknown; choose one of {', '.join(STRATEGIES)}"
            )
        if self.harmonizer is not None and self.layerwise is not None:
            raise OffsiteError(
                "`harmonizer` and `layerwise` are two kinds of emulator; set `layerwise` to null to use stand-ins"
            )
        if self.distill_weight < 0:
            raise OffsiteError("`distill_weight` must be >= 0")
        if not 0.0 <= self.prune < 1.0:
            raise OffsiteError(f"`prune` {self.prune} must be in [0, 1)")
        if self.quantize_bits is not None and not 2 <= self.quantize_bits <= 16:
            raise OffsiteError(
                f"`quantize_bits` {self.quantize_bits} must be between 2 and 16 (leave it out for no quantization)"
            )


def owner_sample(recipe: EmulatorRecipe, tokenizer) -> TokenData:
    """The owner's sample text that selection and fitting measure blocks on."""
    return load_data(
        recipe.selection_data or recipe.distill_data or PUBLIC_SAMPLE, tokenizer, recipe.block_size
    )


def make_emulator(
    full: PreTrainedModel,
    tokenizer,
    plan: SplitPlan,
    recipe: EmulatorRecipe,
    *,
    on_step: Callable[[StepInfo], None] | None = None,
) -> tuple[PreTrainedModel, SplitPlan, dict]:
    """The emulator, the final plan and a manifest record of how it was made (with its transfer score)."""
    record: dict = {"selection": {"strategy": recipe.selection}}
    sample = owner_sample(recipe, tokenizer)
    if recipe.selection in ("redundancy", "similarity"):
        plan = select_recorded(plan, recipe.selection, block_stats(full, sample), record)
    record["selection"].update(strategy=plan.strategy, kept=list(plan.kept))
    # the transfer score is measured on the sample's last sequences, which no fit may use
    split = (
        len(sample) - TRANSFER_SEQUENCES if len(sample) > 2 * TRANSFER_SEQUENCES else len(sample)
    )
    held = sample.examples[split:] or sample.examples
    scored = TokenData(held[:TRANSFER_SEQUENCES], sample.source, sample.sha256, sample.mode)
    fit_on = TokenData(sample.examples[:split], sample.source, sample.sha256, sample.mode)
    score = lambda emu: transfer_score(full, emu, plan, scored, pad_id=pad_id_of(tokenizer))  # noqa: E731
    emulator, scored_as = None, None
    if recipe.harmonizer is not None:  # kept blocks as they are, a stand-in per dropped run
        with spec_fields("harmonizer"):
            emulator, plan, record["harmonizer"] = fit_harmonizers(full, plan, fit_on, recipe.harmonizer)  # fmt: skip
    if recipe.layerwise is not None:
        fitted, record["layerwise"] = distill_layerwise(full, plan, fit_on, recipe.layerwise)
        if recipe.layerwise.gate:
            emulator, scored_as = _better_of(
                build_emulator(full, plan), fitted, score, record["layerwise"]
            )
        else:  # the owner keeps the fit whatever the score says
            emulator = fitted
            record["layerwise"].update(kept="fitted", gate=False)
    if recipe.distill_data is not None:
        emulator, record["distillation"] = _distil(full, tokenizer, plan, recipe, emulator, on_step)
        emulator = emulator.to(full.dtype)  # fitted in float32, kept in the model's dtype
        scored_as = None
    emulator = emulator if emulator is not None else build_emulator(full, plan)
    positions = [plan.emulator_order.index(i) for i in plan.kept]
    if recipe.prune:
        prune_magnitude(emulator, positions, recipe.prune)
        record["pruning"] = {"method": "magnitude", "sparsity": recipe.prune}
    if recipe.quantize_bits is not None:
        quantize_weights(emulator, positions, recipe.quantize_bits)
        record["quantization"] = {"method": "symmetric per-row", "bits": recipe.quantize_bits}
    changed = recipe.prune or recipe.quantize_bits is not None
    record["transfer_score"] = (
        scored_as if scored_as is not None and not changed else score(emulator)
    )
    return emulator, plan, record


def _better_of(
    dropped: PreTrainedModel, fitted: PreTrainedModel, score, record: dict
) -> tuple[PreTrainedModel, dict]:
    """Keep the layer-wise emulator only if its transfer score beats the plain drop's (same plan:
    where the score ranked the recipes as the plug-in did); the record says which was kept."""
    scores = {"dropped": score(dropped), "fitted": score(fitted)}
    record["transfer_score_dropped"], record["transfer_score_fitted"] = (
        scores[k]["mean"] for k in ("dropped", "fitted")
    )
    record["kept"] = (
        "fitted"
        if record["transfer_score_fitted"] >= record["transfer_score_dropped"]
        else "dropped"
    )
    return (fitted if record["kept"] == "fitted" else dropped), scores[record["kept"]]


def _distil(
    full, tokenizer, plan: SplitPlan, recipe: EmulatorRecipe, start, on_step
) -> tuple[PreTrainedModel, dict]:
    data = load_data(recipe.distill_data, tokenizer, recipe.block_size)
    train_data, val_data = split_validation(data, recipe.val_fraction, recipe.distill.seed)
    emulator, summary = distill_emulator(
        full, plan, train_data, recipe.distill, pad_id=pad_id_of(tokenizer), weight=recipe.distill_weight,
        val_data=val_data, checkpoint_dir=recipe.checkpoint_dir, resume=recipe.resume, on_step=on_step, start=start,
    )  # fmt: skip
    keys = (
        "steps",
        "best_step",
        "best_val_perplexity",
        "val_perplexity",
        "weight",
        "data_sha256",
        "config",
    )
    return emulator, {k: summary[k] for k in keys}
