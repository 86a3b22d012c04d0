"""Split plan: which blocks form the trainable adapter and which middle blocks the emulator keeps."""

from __future__ import annotations

from dataclasses import dataclass

from offsite.errors import OffsiteError

STRATEGY_UNIFORM = "uniform"
STRATEGY_EXPLICIT = "explicit"


@dataclass(frozen=True)
class SplitPlan:
    """Adapter blocks (trainable) and kept emulator blocks, as indices into the full model."""

    num_layers: int
    adapter: tuple[int, ...]
    kept: tuple[int, ...]
    strategy: str = STRATEGY_UNIFORM

    def __post_init__(self) -> None:
        n = self.num_layers
        for name, idx in (("adapter", self.adapter), ("kept", self.kept)):
            bad = [i for i in idx if not 0 <= i < n]
            if bad:
                raise OffsiteError(
                    f"{name} block indices {bad} out of range for a {n}-block model (0..{n - 1})"
                )
            if len(set(idx)) != len(idx):
                raise OffsiteError(f"{name} block indices {list(idx)} contain duplicates")
        overlap = sorted(set(self.adapter) & set(self.kept))
        if overlap:
            raise OffsiteError(
                f"blocks {overlap} are both adapter and emulator blocks; they must not overlap"
            )
        if not self.adapter:
            raise OffsiteError(
                "the adapter has no blocks; set `adapter_bottom`/`adapter_top` or `adapter_blocks`"
            )
        if sorted(self.adapter) != list(self.adapter) or sorted(self.kept) != list(self.kept):
            raise OffsiteError("block indices must be sorted ascending")

    @property
    def middle(self) -> tuple[int, ...]:
        """Blocks that are neither adapter blocks: the part the emulator compresses."""
        return tuple(i for i in range(self.num_layers) if i not in self.adapter)

    @property
    def dropped(self) -> tuple[int, ...]:
        """Middle blocks left out of the emulator."""
        return tuple(i for i in self.middle if i not in self.kept)

    @property
    def emulator_order(self) -> tuple[int, ...]:
        """Original indices of the bundle's blocks, in model order."""
        return tuple(sorted(self.adapter + self.kept))


def uniform_indices(n: int, k: int) -> list[int]:
    """k of range(n), evenly spaced, first and last included (paper: round(i*(n-1)/(k-1)))."""
    if not 1 <= k <= n:
        raise OffsiteError(f"cannot keep {k} of {n} middle blocks; choose 1..{n}")
    if k == 1:
        return [0]
    # Python's round() is banker's rounding; use half-up so the rule is the paper's.
    return sorted({int(i * (n - 1) / (k - 1) + 0.5) for i in range(k)})


def adapter_indices(num_layers: int, bottom: int, top: int) -> tuple[int, ...]:
    """The bottom `bottom` and top `top` blocks."""
    if bottom < 0 or top < 0:
        raise OffsiteError("`adapter_bottom` and `adapter_top` must be >= 0")
    if bottom + top >= num_layers:
        raise OffsiteError(
            f"adapter of {bottom} bottom + {top} top blocks leaves no middle in a {num_layers}-block model"
        )
    return tuple(range(bottom)) + tuple(range(num_layers - top, num_layers))


def make_plan(
    num_layers: int,
    *,
    adapter_bottom: int = 2,
    adapter_top: int = 2,
    adapter_blocks: tuple[int, ...] | None = None,
    emulator_layers: int | None = None,
    drop_ratio: float | None = None,
    kept_blocks: tuple[int, ...] | None = None,
) -> SplitPlan:
    """Build a validated plan from the CLI's choices (adapter by count or indices, emulator by K, ratio or indices)."""
    if adapter_blocks is not None:
        adapter = tuple(sorted(adapter_blocks))
    else:
        adapter = adapter_indices(num_layers, adapter_bottom, adapter_top)
    middle = [i for i in range(num_layers) if i not in adapter]
    if not middle and kept_blocks is None:
        raise OffsiteError("the adapter covers every block; leave some blocks for the emulator")
    chosen = [x is not None for x in (emulator_layers, drop_ratio, kept_blocks)]
    if sum(chosen) > 1:
        raise OffsiteError("give at most one of `emulator_layers`, `drop_ratio`, `emulator_blocks`")
    if kept_blocks is not None:
        return SplitPlan(num_layers, adapter, tuple(sorted(kept_blocks)), STRATEGY_EXPLICIT)
    if drop_ratio is not None:
        if not 0.0 <= drop_ratio < 1.0:
            raise OffsiteError(f"`drop_ratio` {drop_ratio} must be in [0, 1)")
        emulator_layers = max(1, round(len(middle) * (1.0 - drop_ratio)))
    if emulator_layers is None:
        emulator_layers = max(1, len(middle) // 2)
    if not 1 <= emulator_layers <= len(middle):
        raise OffsiteError(
            f"`emulator_layers` {emulator_layers} is not possible: the middle has {len(middle)} blocks "
            f"(model {num_layers} minus {len(adapter)} adapter blocks); choose 1..{len(middle)}"
        )
    kept = tuple(middle[j] for j in uniform_indices(len(middle), emulator_layers))
    return SplitPlan(num_layers, adapter, kept, STRATEGY_UNIFORM)


def bundle_plan(manifest: dict) -> SplitPlan:
    """The split plan a bundle was made with, from its (verified) manifest."""
    adapter = [b["source"] for b in manifest["blocks"] if b["role"] == "adapter"]
    e = manifest["emulator"]
    return SplitPlan(manifest["base_model"]["num_layers"], tuple(adapter), tuple(e["kept"]),
                     e.get("strategy", STRATEGY_UNIFORM))  # fmt: skip
