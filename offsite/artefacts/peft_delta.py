"""PEFT inside the adapter: LoRA, IA3, LN tuning or a soft prompt, through Hugging Face `peft`.

The data owner attaches PEFT modules to the emulator's adapter blocks only (prompt tuning: a soft
prompt at the input) and returns the delta in peft's own layout, keyed by the *full* model's
names, so `PeftModel.from_pretrained(full_model, adapter_dir)` loads it as it is. The PEFT config
is never taken on trust: both ends rebuild it from the options in the signed manifest and the
bundle's adapter blocks; the shipped `adapter_config.json` must agree with that rebuild, and the
key set and shapes come from applying it to the bundle's architecture (on the meta device).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from peft import (
    PeftConfig,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from transformers import PreTrainedModel

from offsite.artefacts.adapter import PEFT_CONFIG, Adapter, remap_blocks
from offsite.artefacts.bundle import Bundle
from offsite.artefacts.peft_methods import Where, method_of
from offsite.artefacts.shards import load_blocks, meta_model
from offsite.artefacts.tensorcheck import (
    TensorSpec,
    all_finite,
    check_spec,
    dtype_name,
    load_checked,
    spec_of,
)
from offsite.errors import OffsiteError, VerificationError
from offsite.models.architectures import arch_spec, block_prefix, get_blocks

MAX_LORA_SCALE = 1024.0  # alpha / rank above this is no training setting anyone uses: refused
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# fields of peft's config that describe where it came from, not what it does
_PROVENANCE = {
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
}


@dataclass(frozen=True)
class PeftOptions:
    """Which PEFT method trains the adapter, and its settings (`targets`: module names inside a
    block, as the last parts of their names; empty = the architecture registry's for the method)."""

    method: str
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ()
    virtual_tokens: int = 20

    def __post_init__(self) -> None:
        method_of(self.method)
        numbers = (self.rank, self.alpha, self.dropout, self.virtual_tokens)
        if any(
            isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)
            for v in numbers
        ):
            raise OffsiteError(
                "`rank`, `alpha`, `dropout` and `virtual_tokens` must be finite numbers"
            )
        if not isinstance(self.rank, int) or not isinstance(self.virtual_tokens, int):
            raise OffsiteError("`rank` and `virtual_tokens` must be whole numbers")
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1 or self.virtual_tokens < 1:
            raise OffsiteError(
                "`rank` and `virtual_tokens` must be >= 1, `alpha` > 0, `dropout` in [0, 1)"
            )
        if not 0 < self.alpha / self.rank <= MAX_LORA_SCALE:
            raise OffsiteError(
                f"`alpha` / `rank` must be in (0, {MAX_LORA_SCALE:g}] (got {self.alpha}/{self.rank})"
            )
        bad = [t for t in self.targets if not isinstance(t, str) or not _NAME.match(t)]
        if bad:
            raise OffsiteError(
                f"`targets` {bad[0]!r} is not a module name (like q_proj or mlp.c_proj)"
            )

    def resolved(self, model_type: str) -> PeftOptions:
        """These options with the registry's targets filled in (what the manifest records)."""
        default = method_of(self.method).targets
        if self.targets or default is None:
            return self
        return replace(self, targets=getattr(arch_spec(model_type).peft, default))

    def to_json(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_manifest(cls, data: dict, where: str) -> PeftOptions:
        try:
            return cls(**{**data, "targets": tuple(data.get("targets", ()))})
        except (TypeError, OffsiteError) as e:
            raise VerificationError(f"{where}: 'peft' options are not valid ({e})") from None


def _pattern(blocks: str, layers: list[int], names: tuple[str, ...]) -> str:
    """A regex (peft full-matches it) for modules `names` inside the blocks `layers`, nowhere else."""
    alternatives = "|".join(re.escape(n) for n in names)
    return rf"{re.escape(blocks)}\.({'|'.join(map(str, layers))})\.(?:.+\.)?({alternatives})"


def peft_config(options: PeftOptions, model_type: str, layers: list[int]) -> PeftConfig:
    """peft's config for `options` confined to the blocks `layers` of a `model_type` model."""
    spec, method = arch_spec(model_type), method_of(options.method)
    if method.config is None:
        raise OffsiteError(
            f"`peft` {options.method} trains the adapter blocks' {method.own_parameters}; it has no peft config"
        )
    chosen = options.resolved(model_type).targets
    ff = tuple(n for n in chosen if n in spec.peft.feedforward)
    where = Where(targets=_pattern(spec.blocks, layers, chosen),
                  feedforward=_pattern(spec.blocks, layers, ff) if ff else [],
                  fan_in_fan_out="Conv1D" in spec.matmuls)  # fmt: skip
    return method.config(options, where)


def _wrap(model: PreTrainedModel, config: PeftConfig):
    with warnings.catch_warnings():  # LN tuning works on any norm; peft warns about all but one
        warnings.filterwarnings("ignore", "Unsupported layer type", UserWarning)
        return get_peft_model(model, config)


def attach(model: PreTrainedModel, options: PeftOptions, layers: list[int]):
    """Wrap `model` with PEFT modules on the blocks `layers`; only they train."""
    try:
        return _wrap(model, peft_config(options, model.config.model_type, layers))
    except ValueError as e:  # e.g. no target module matched
        raise OffsiteError(f"`peft` {options.method}: {str(e).splitlines()[0]}") from None


def delta_state(peft_model, bundle: Bundle) -> dict[str, torch.Tensor]:
    """The trained PEFT delta of an emulator, keyed by the full model's names."""
    state = _to_full_names(get_peft_model_state_dict(peft_model), bundle)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _to_full_names(state: dict[str, torch.Tensor], bundle: Bundle) -> dict[str, torch.Tensor]:
    """peft's 'base_model.model.<blocks>.<i>.' keys renamed from emulator to full-model blocks
    (a soft prompt's key has no block and stays)."""
    blocks = bundle.manifest["base_model"]["block_prefix"]
    mapping = dict(zip(bundle.adapter_positions, bundle.adapter_sources, strict=True))
    return remap_blocks(state, f"base_model.model.{blocks}", mapping, keep_others=True)


def full_config(options: PeftOptions, bundle: Bundle) -> dict:
    """The `adapter_config.json` a delta for `bundle` must carry: the config on the full model."""
    model_type = bundle.manifest["base_model"]["model_type"]
    config = peft_config(options, model_type, bundle.adapter_sources).to_dict()
    return json.loads(json.dumps(config, default=_plain))  # enums and sets as JSON has them


def _plain(value):
    return sorted(value) if isinstance(value, (set, frozenset)) else str(value)


def expected_delta_spec(options: PeftOptions, bundle: Bundle) -> TensorSpec:
    """Key set, dtypes and shapes of a delta for `bundle`: `options` applied to its architecture."""
    model = meta_model(bundle.path, dtype=torch.float32)  # the server verifies from many threads
    try:
        peft_model = _wrap(
            model, peft_config(options, model.config.model_type, bundle.adapter_positions)
        )
    except (
        ValueError,
        TypeError,
        KeyError,
    ) as e:  # e.g. targets that name no module, or a whole block
        raise VerificationError(
            f"the adapter's PEFT options do not apply to the bundle's blocks ({str(e).splitlines()[0][:200]})"
        ) from None
    if not method_of(
        options.method
    ).in_weights:  # a soft prompt: peft would copy it to the CPU to save it
        weight = peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight
        return {"prompt_embeddings": (dtype_name(weight.dtype), tuple(weight.shape))}
    return spec_of(_to_full_names(get_peft_model_state_dict(peft_model), bundle))


def _check_config(shipped_path: Path, expected: dict) -> None:
    """The shipped PEFT config must say what the manifest's options say, field by field."""
    try:
        shipped = json.loads(shipped_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VerificationError(f"{shipped_path}: not readable JSON ({e})") from None
    if not isinstance(shipped, dict):
        raise VerificationError(f"{shipped_path}: not a JSON object")
    for key in sorted(set(shipped) | set(expected)):
        if key in _PROVENANCE:
            continue
        if key not in expected:
            if shipped[key] not in (None, False, [], {}):
                raise VerificationError(
                    f"{shipped_path}: field {key!r} is not one this owner knows; refused"
                )
        elif key in shipped and shipped[key] != expected[key]:
            raise VerificationError(
                f"{shipped_path}: {key} = {shipped[key]!r}, but the manifest's options on the bundle's "
                f"adapter blocks give {expected[key]!r}"
            )


def verify_delta(adapter: Adapter, bundle: Bundle) -> tuple[PeftOptions, dict[str, torch.Tensor]]:
    """Check a PEFT adapter's config and tensors against its bundle; returns its options and delta."""
    options = PeftOptions.from_manifest(adapter.manifest["peft"], str(adapter.path))
    _check_config(adapter.path / PEFT_CONFIG, full_config(options, bundle))
    expected = expected_delta_spec(options, bundle)
    check_spec(str(adapter.path), adapter.spec, expected)
    delta = load_checked(adapter.weights, expected)
    check = method_of(options.method).check
    if check is not None:
        check(adapter.path, options, delta)
    return options, delta


def plug_delta(model: PreTrainedModel, options: PeftOptions, bundle: Bundle,
               delta: dict[str, torch.Tensor]):  # fmt: skip
    """The full model with a verified delta loaded as PEFT modules (a PeftModel)."""
    peft_model = attach(model, options, bundle.adapter_sources)
    loaded = set_peft_model_state_dict(peft_model, delta)
    if [k for k in loaded.unexpected_keys if k != "prompt_embeddings"]:  # a prompt loads apart
        raise VerificationError(
            f"delta tensors {loaded.unexpected_keys[:3]} have no place in the model"
        )
    return peft_model


def merge_delta(model: PreTrainedModel, options: PeftOptions, bundle: Bundle,
                delta: dict[str, torch.Tensor]) -> PreTrainedModel:  # fmt: skip
    """Fold a verified LoRA, IA3 or LN-tuning delta into the full model's weights."""
    if not method_of(options.method).in_weights:
        raise OffsiteError(
            f"`peft` {options.method} has no weights to fold in; keep it beside the model"
        )
    merged = plug_delta(model, options, bundle, delta).merge_and_unload()
    blocks = get_blocks(merged)
    for i in bundle.adapter_sources:
        for n, p in blocks[i].named_parameters():
            if p.is_floating_point() and not all_finite(p.detach()):
                raise VerificationError(
                    f"merging the delta makes block {i}'s {n} non-finite; refused"
                )
    return merged


def merged_blocks(root: Path, bundle: Bundle, options: PeftOptions,
                  delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # fmt: skip
    """The adapter blocks of the model at `root` with a verified delta folded in, loading only them."""
    model = merge_delta(load_blocks(root, bundle.adapter_sources), options, bundle, delta)
    prefix = block_prefix(model.config.model_type)
    blocks = get_blocks(model)
    return {f"{prefix}.{i}.{n}": p.detach().contiguous() for i in bundle.adapter_sources
            for n, p in blocks[i].named_parameters()}  # fmt: skip
