"""Architecture registry: everything that differs between model families, as data.

No other module knows model families. Each entry says where the transformer block list lives,
which config attribute holds the depth, which config lists have one entry per block (and must be
sliced when blocks are dropped), and which config settings make a block depend on its absolute
position in a way that renumbering cannot preserve.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from offsite.errors import OffsiteError

# Attribute that attention modules use to find their slot in the KV cache.
LAYER_INDEX_ATTR = "layer_idx"


@dataclass(frozen=True)
class PeftTargets:
    """Modules inside a block that PEFT methods attach to, by the last parts of their names."""

    linear: tuple[str, ...]  # LoRA: every matmul of the block
    ia3: tuple[str, ...]  # IA3: the key and value projections and the MLP's output projection
    feedforward: tuple[str, ...]  # the ones of `ia3` inside the MLP (IA3 scales their input)
    norms: tuple[str, ...]  # LN tuning


_LLAMA_PEFT = PeftTargets(
    linear=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    ia3=("k_proj", "v_proj", "down_proj"),
    feedforward=("down_proj",),
    norms=("input_layernorm", "post_attention_layernorm"),
)
_FUSED_QKV_PEFT = PeftTargets(  # GPT-NeoX, BLOOM, Falcon
    linear=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
    ia3=("query_key_value", "dense_4h_to_h"),
    feedforward=("dense_4h_to_h",),
    norms=("input_layernorm", "post_attention_layernorm", "ln_attn", "ln_mlp"),
)


@dataclass(frozen=True)
class MlpLayout:
    """Where a block's attention output and its MLP's matmuls are (paths inside the block), for
    a stand-in block: attention silenced, an MLP of a few hidden units (`emulator/harmonizer.py`).
    `fused`: how many matrices the MLP's input holds stacked along its outputs (gate and up: 2)."""

    attention_out: tuple[str, ...]
    mlp_in: tuple[str, ...]
    mlp_out: tuple[str, ...]
    fused: int = 1


_LLAMA_MLP = MlpLayout(("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
_FUSED_QKV_MLP = MlpLayout(
    ("self_attention.dense",), ("mlp.dense_h_to_4h",), ("mlp.dense_4h_to_h",)
)


@dataclass(frozen=True)
class ArchSpec:
    """How one `config.model_type` lays out its blocks."""

    blocks: str
    depth_attr: str = "num_hidden_layers"
    per_layer_lists: tuple[str, ...] = ("layer_types",)
    # config attribute -> value under which a dropped/renumbered block would change behaviour
    position_dependent: dict[str, object] = field(default_factory=dict)
    # module class name holding a block's matmul weights -> the weight axis that indexes outputs
    # (nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out])
    matmuls: dict[str, int] = field(default_factory=lambda: {"Linear": 0})
    peft: PeftTargets = _LLAMA_PEFT
    mlp: MlpLayout = _LLAMA_MLP


_DECODER = ArchSpec(blocks="model.layers")
_GEMMA2_NORMS = (*_LLAMA_PEFT.norms, "pre_feedforward_layernorm", "post_feedforward_layernorm")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _DECODER,
    "mistral": _DECODER,
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "gemma": _DECODER,
    "gemma2": ArchSpec(blocks="model.layers", peft=replace(_LLAMA_PEFT, norms=_GEMMA2_NORMS)),
    "gemma3_text": ArchSpec(blocks="model.layers", peft=replace(_LLAMA_PEFT, norms=_GEMMA2_NORMS)),
    "phi3": ArchSpec(
        blocks="model.layers",
        peft=replace(
            _LLAMA_PEFT,
            linear=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
            ia3=("qkv_proj", "down_proj"),
        ),
        mlp=MlpLayout(("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",), fused=2),
    ),
    "opt": ArchSpec(
        blocks="model.decoder.layers",
        peft=PeftTargets(
            linear=("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
            ia3=("k_proj", "v_proj", "fc2"),
            feedforward=("fc2",),
            norms=("self_attn_layer_norm", "final_layer_norm"),
        ),
        mlp=MlpLayout(("self_attn.out_proj",), ("fc1",), ("fc2",)),
    ),
    "gpt2": ArchSpec(
        blocks="transformer.h",
        depth_attr="n_layer",
        position_dependent={"scale_attn_by_inverse_layer_idx": True},
        matmuls={"Conv1D": 1},
        peft=PeftTargets(
            linear=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
            ia3=("attn.c_attn", "mlp.c_proj"),
            feedforward=("mlp.c_proj",),
            norms=("ln_1", "ln_2"),
        ),
        mlp=MlpLayout(("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    ),
    "gpt_neox": ArchSpec(
        blocks="gpt_neox.layers",
        peft=_FUSED_QKV_PEFT,
        mlp=replace(_FUSED_QKV_MLP, attention_out=("attention.dense",)),
    ),
    "bloom": ArchSpec(
        blocks="transformer.h", depth_attr="n_layer", peft=_FUSED_QKV_PEFT, mlp=_FUSED_QKV_MLP
    ),
    "falcon": ArchSpec(blocks="transformer.h", peft=_FUSED_QKV_PEFT, mlp=_FUSED_QKV_MLP),
    "gptj": ArchSpec(
        blocks="transformer.h",
        depth_attr="n_layer",
        peft=PeftTargets(
            linear=("q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"),
            ia3=("k_proj", "v_proj", "fc_out"),
            feedforward=("fc_out",),
            norms=("ln_1",),
        ),
        mlp=MlpLayout(("attn.out_proj",), ("mlp.fc_in",), ("mlp.fc_out",)),
    ),
}


def supported_model_types() -> list[str]:
    """Sorted names of the registered `config.model_type` values."""
    return sorted(ARCHITECTURES)


def arch_spec(model_type: str) -> ArchSpec:
    """The registry entry for `model_type`, or a clear error listing the supported ones."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise OffsiteError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        ) from None


def check_position_independent(config) -> None:
    """Refuse configs whose blocks depend on their absolute index (dropping would change them)."""
    spec = arch_spec(config.model_type)
    for attr, bad in spec.position_dependent.items():
        if getattr(config, attr, None) == bad:
            raise OffsiteError(
                f"config.{attr}={bad!r} makes each {config.model_type} block depend on its depth, "
                "so an emulator cannot drop blocks without changing them; this model is not supported"
            )


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's transformer block list."""
    spec = arch_spec(model.config.model_type)
    try:
        blocks = model.get_submodule(spec.blocks)
    except AttributeError:
        raise OffsiteError(
            f"{type(model).__name__} has no block list at {spec.blocks!r}; "
            "load it as a causal LM (AutoModelForCausalLM)"
        ) from None
    if not isinstance(blocks, nn.ModuleList):
        raise OffsiteError(f"{type(model).__name__}.{spec.blocks} is not a ModuleList")
    return blocks


def block_matmuls(model: nn.Module, positions: list[int]) -> Iterator[tuple[nn.Module, int]]:
    """(module, output axis of its weight) for every matmul-weight module in the blocks at `positions`."""
    matmuls = arch_spec(model.config.model_type).matmuls
    blocks = get_blocks(model)
    for i in positions:
        for module in blocks[i].modules():
            axis = matmuls.get(type(module).__name__)
            if axis is not None:
                yield module, axis


def block_prefix(model_type: str) -> str:
    """State-dict prefix of the block list, e.g. 'model.layers'."""
    return arch_spec(model_type).blocks


def num_blocks(config) -> int:
    """Depth of the model described by `config`."""
    return int(getattr(config, arch_spec(config.model_type).depth_attr))


def set_blocks(model: nn.Module, kept: list[int]) -> None:
    """Keep only the blocks at indices `kept` (in that order), renumbered 0..len-1, in place.

    Updates the depth, every per-layer config list, and each attention module's cache index so
    that the KV cache and `generate()` keep working.
    """
    spec = arch_spec(model.config.model_type)
    old = get_blocks(model)
    new = nn.ModuleList([old[i] for i in kept])
    parent_name, _, attr = spec.blocks.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)
    for new_index, block in enumerate(new):
        for module in block.modules():
            if hasattr(module, LAYER_INDEX_ATTR):
                setattr(module, LAYER_INDEX_ATTR, new_index)
    slice_config(model.config, spec, kept)


def slice_config(config, spec: ArchSpec, kept: list[int]) -> None:
    depth = int(getattr(config, spec.depth_attr))
    for name in spec.per_layer_lists:
        values = getattr(config, name, None)
        if values is None:
            continue
        if len(values) != depth:
            raise OffsiteError(
                f"config.{name} has {len(values)} entries but the model has {depth} blocks"
            )
        setattr(config, name, [values[i] for i in kept])
    setattr(config, spec.depth_attr, len(kept))


def hidden_of(output) -> torch.Tensor:
    """A block's output hidden state: some families return it alone, others first in a tuple."""
    return output[0] if isinstance(output, tuple) else output
