"""Forward passes through a model on disk with one block in memory at a time (owners of big models).

Block selection and layer-wise fitting only ever need the hidden states entering and leaving
blocks, so they can run block by block: the sample's hidden states stay in memory, each block is
loaded from the safetensors files, run over them and let go. How the model calls each block
(rotary tables, masks per attention type, ALiBi) is taken from one pass of the model's own base
forward in which every block is a stand-in that records its arguments and passes the state on:
only the embeddings and the modules around the blocks are ever materialised.

Peak memory: one block (two while one is being fitted), the embeddings, and the sample's states.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from offsite.artefacts.shards import load_tensor, meta_model, state_names, tensor_map
from offsite.emulator.layerwise import BlockCall, LayerwiseConfig, advance_chain, fit_block, spans
from offsite.emulator.plan import SplitPlan
from offsite.emulator.selection import BlockStats
from offsite.errors import OffsiteError
from offsite.models.architectures import arch_spec, block_prefix, get_blocks, slice_config
from offsite.training.data import TokenData, collate


class _Stop(Exception):
    """Raised by the last stand-in: nothing after the blocks is needed."""


class _StandIn(nn.Module):
    """Takes a block's place in the base model's forward: records the call, returns the state."""

    def __init__(self, index: int, record: Callable[[int, tuple, dict], None], last: bool, template: nn.Module) -> None:  # fmt: skip
        super().__init__()
        self.index, self.record, self.last = index, record, last
        self.__dict__["_template"] = template  # not a submodule: it stays on meta

    def __getattr__(self, name: str):  # what the model reads off a block (e.g. its attention type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_template"], name)

    def forward(self, *args, **kwargs):
        self.record(self.index, args, kwargs)
        if self.last:
            raise _Stop
        # as a tuple: models that take `outputs[0]` get the state, and the next stand-in unwraps it
        return (args[0] if args else kwargs["hidden_states"],)


class BlockwiseModel:
    """The model stored at `root` (safetensors), run block by block."""

    def __init__(self, root: Path) -> None:
        self.stored, self.names = tensor_map(root), state_names(root)
        config = AutoConfig.from_pretrained(root)
        self.prefix = block_prefix(config.model_type)
        first = self.names[next(n for n in self.names if n.startswith(self.prefix + "."))]
        self.dtype = getattr(torch, self.stored[first].dtype)
        model = meta_model(root, dtype=self.dtype)
        self.base_name = arch_spec(config.model_type).blocks.rpartition(".")[0]
        self.blocks = list(get_blocks(model))  # on meta: templates, materialised one at a time
        self._donor = _donor(config, self.dtype)  # buffers that are computed, not stored
        self.depth = len(self.blocks)
        stand_ins = nn.ModuleList(
            _StandIn(i, self._record, i == self.depth - 1, b) for i, b in enumerate(self.blocks)
        )
        parent, _, attr = arch_spec(config.model_type).blocks.rpartition(".")
        setattr(model.get_submodule(parent), attr, stand_ins)
        self.base = model.get_submodule(self.base_name)
        self.base.to_empty(device="cpu")
        _load(
            self.base, self._stored_state(self.base_name), self._donor.get_submodule(self.base_name)
        )
        self.base.eval()
        self._calls: dict[int, BlockCall] = {}
        self._entering: torch.Tensor | None = None

    def _stored_state(self, module_name: str) -> Callable[[str], torch.Tensor]:
        return lambda name: load_tensor(self.stored[self.names[f"{module_name}.{name}"]])

    def _record(self, index: int, args: tuple, kwargs: dict) -> None:
        if not args:
            args = (kwargs.pop("hidden_states"),)
        state = args[0][0] if isinstance(args[0], tuple) else args[0]
        if index == 0:
            self._entering = state
        self._calls[index] = BlockCall.of(args, kwargs)  # leaves the state out

    @torch.no_grad()
    def enter(self, batch: dict) -> tuple[torch.Tensor, list[BlockCall]]:
        """The state entering block 0 for `batch`, and how the model calls each block on it."""
        self._calls = {}
        with contextlib.suppress(_Stop):  # the last stand-in stops the pass
            self.base(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                use_cache=False,
            )
        calls = [self._calls[i] for i in range(self.depth)]
        return self._entering, calls

    def block(self, index: int) -> nn.Module:
        """Block `index`, loaded from the files (frozen, eval mode)."""
        block = copy.deepcopy(self.blocks[index])
        block.to_empty(device="cpu")
        donor = get_blocks(self._donor)[0]
        _load(block, self._stored_state(f"{self.prefix}.{index}"), donor)
        block.requires_grad_(False)
        return block.eval()


def _donor(config, dtype: torch.dtype) -> nn.Module:
    """A model of one block per kind, built for real (weights left uninitialised): the source of
    the buffers that modules compute when they are built (rotary frequencies, position tables)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older 5.x releases kept it here
        from transformers.modeling_utils import no_init_weights

    spec = arch_spec(config.model_type)
    kinds = [getattr(config, name, None) for name in spec.per_layer_lists]
    rows = list(zip(*[k for k in kinds if k is not None], strict=True)) or [()]
    first = sorted({rows.index(row) for row in rows})  # one block of each kind (attention type)
    one = copy.deepcopy(config)
    slice_config(one, spec, first)
    with no_init_weights():
        donor = AutoModelForCausalLM.from_config(one, dtype=dtype)
    # from_pretrained computes such tables again once it has loaded, outside the model's dtype
    # (GPT-J's position table: built in bf16 it differs from the loaded model's)
    for module in donor.modules():
        if module._non_persistent_buffers_set and not list(module.parameters(recurse=False)):
            donor._init_weights(module)
    return donor


def _load(module: nn.Module, stored: Callable[[str], torch.Tensor], donor: nn.Module) -> None:
    """Fill a materialised `module`: state-dict entries from the files, computed buffers from `donor`."""
    state = module.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            value.copy_(stored(name))
        for name, _ in module.named_buffers():
            if name not in state:
                owner, _, leaf = name.rpartition(".")
                module.get_submodule(owner)._buffers[leaf] = donor.get_buffer(name).clone()


def _batches(data: TokenData, batch_size: int, limit: int) -> list[dict]:
    examples = data.examples[:limit]
    return [collate(examples[i : i + batch_size], 0) for i in range(0, len(examples), batch_size)]


@torch.no_grad()
def block_stats_blockwise(model: BlockwiseModel, data: TokenData, *, batch_size: int = 4, max_sequences: int = 32) -> BlockStats:  # fmt: skip
    """Each block's redundancy (as `selection.block_stats`), one block in memory at a time."""
    batches = _batches(data, batch_size, max_sequences)
    entered = [model.enter(b) for b in batches]
    states, calls = [s for s, _ in entered], [c for _, c in entered]
    masks = [b["attention_mask"].bool() for b in batches]
    redundancy, tokens = [], sum(int(m.sum()) for m in masks)
    if tokens == 0:
        raise OffsiteError("no tokens to measure block statistics on; give more selection data")
    for i in range(model.depth):
        block, total = model.block(i), 0.0
        for j, x in enumerate(states):
            y = calls[j][i].run(block, x)
            a, b = x[masks[j]].float(), y[masks[j]].float()
            total += float((1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).sum().double())
            states[j] = y
        redundancy.append(total / tokens)
        del block
    return BlockStats(redundancy, [])


def distill_layerwise_blockwise(
    model: BlockwiseModel,
    plan: SplitPlan,
    data: TokenData,
    cfg: LayerwiseConfig,
    save: Callable[[int, nn.Module], None],
) -> dict:
    """`layerwise.distill_layerwise` one block at a time: each kept block is fitted to its span and
    handed to `save(index, block)`; returns the same record. Input noise and gradient matching
    need a span's blocks (or the whole model) at once, and are refused."""
    if cfg.noise or cfg.grad_weight:
        raise OffsiteError(
            "`stream`: layer-wise noise and gradient matching need the whole model in memory"
        )
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    entered = [model.enter(b) for b in _batches(data, cfg.batch_size, cfg.max_sequences)]
    teacher, calls = [s for s, _ in entered], [c for _, c in entered]
    table = spans(plan)
    teacher = _run(model, range(table[0][1]), teacher, calls)  # the bottom adapter blocks
    chain, report = list(teacher), []
    for k, s, e in table:
        inputs = list(teacher) if cfg.inputs == "teacher" else chain
        student = model.block(k)
        teacher = _run(model, range(s, e), teacher, calls, keep={k: student})
        block_calls = [c[k] for c in calls]
        trivial = e - s == 1 and cfg.inputs == "teacher"  # nothing dropped here
        first, last = (
            (0.0, 0.0)
            if trivial
            else fit_block(student, [], inputs, None, block_calls, teacher, cfg, gen)
        )
        chain, row = advance_chain(student, block_calls, chain, teacher)
        report.append({"block": k, "span": [s, e - 1], "loss_first": round(first, 5), "loss_last": round(last, 5), **row})  # fmt: skip
        save(k, student)
        del student
    return {"method": "layerwise", "steps_per_block": cfg.steps, "learning_rate": cfg.learning_rate,
            "batch_size": cfg.batch_size, "sequences": min(len(data), cfg.max_sequences), "inputs": cfg.inputs,
            "noise": 0.0, "grad_weight": 0.0, "data_sha256": data.sha256, "spans": report,
            "streamed": "fitted one block in memory at a time"}  # fmt: skip


@torch.no_grad()
def _run(
    model: BlockwiseModel, indices, states, calls, keep: dict | None = None
) -> list[torch.Tensor]:
    """The states through the blocks `indices` of the full model, each loaded and let go in turn
    (`keep`: blocks already in memory, by index)."""
    for i in indices:
        block = keep[i] if keep and i in keep else model.block(i)
        states = [calls[j][i].run(block, x) for j, x in enumerate(states)]
        del block
    return states


def save_block_file(
    directory: Path, prefix: str, position: dict[int, int]
) -> Callable[[int, nn.Module], None]:
    """A `save` for `distill_layerwise_blockwise`: block k's tensors, under the name the bundle
    gives it, into DIR/block-k.safetensors."""

    def save(index: int, block: nn.Module) -> None:
        state = {
            f"{prefix}.{position[index]}.{n}": v.contiguous() for n, v in block.state_dict().items()
        }
        save_file(state, str(directory / f"block-{index}.safetensors"), metadata={"format": "pt"})

    return save
