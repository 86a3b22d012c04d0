"""Data-owner fine-tuning: train only the bundle's adapter blocks, then write the adapter artefact."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.nn.utils import parametrize
from transformers import PreTrainedModel

from offsite.artefacts.adapter import (
    Adapter,
    block_parameters,
    extract_adapter,
    only_trained,
    save_adapter,
    spec_from_bundle,
)
from offsite.artefacts.bundle import Bundle, check_bundle_model
from offsite.artefacts.peft_delta import PeftOptions, attach, delta_state, full_config
from offsite.artefacts.peft_methods import method_of
from offsite.artefacts.signing import Signer
from offsite.artefacts.tensorcheck import spec_bytes
from offsite.atomic import check_apart, check_free_space, check_output_dir, check_writable
from offsite.errors import OffsiteError
from offsite.models.architectures import get_blocks
from offsite.training.allocator import limit_heap_growth
from offsite.training.checkpoint import remove_checkpoints
from offsite.training.config import StepInfo, TrainConfig
from offsite.training.data import TokenData, load_data, pad_id_of, split_validation
from offsite.training.loop import make_accelerator, train
from offsite.training.loss import causal_lm_of

log = logging.getLogger(__name__)


# The adapter's learning rate (docs/results/utility.md: 200 steps of 4x256 tokens, three seeds,
# four tasks). 3e-4 keeps both privacy floors on two tasks of four where 1e-3 keeps them on one,
# and closes more of the gap on average (61% against 56%). Paired seed by seed, on Tiny
# Shakespeare it gives up 3.5 points of the gap for +0.25x of privacy margin (the 1.3x floor kept
# only at 3e-4), on ARC-Easy +0.8 points of margin; on SST-2 and AG News a seed's plug-in
# collapses at either rate. (At 40 steps, single runs had preferred 1e-3.)
ADAPTER_LEARNING_RATE = 3e-4


@dataclass(frozen=True)
class FinetuneJob:
    """What to fine-tune on, and where the adapter and checkpoints go."""

    data: Path
    out: Path
    block_size: int = 512
    val_fraction: float = 0.1
    checkpoint_dir: Path | None = None
    resume: bool = False
    overwrite: bool = False
    keep_checkpoints: bool = False
    peft: PeftOptions | None = None  # train PEFT modules inside the adapter blocks instead of them
    # the allocator's threshold fixed (allocator.py) and bf16-exact frozen weights held in bf16
    # (hold_frozen_weights): less peak memory on CPU, same results, slower
    low_memory: bool = False

    @property
    def checkpoints(self) -> Path:
        return self.checkpoint_dir or self.out.with_name(self.out.name + ".ckpt")


def freeze_except_adapter(model: PreTrainedModel, bundle: Bundle, trained: str = "all") -> int:
    """Freeze everything but the adapter blocks (`trained`: all their tensors, or the biases);
    returns the number of trainable parameters."""
    model.requires_grad_(False)
    trainable = only_trained(block_parameters(model, bundle.adapter_positions), trained)
    if not trainable:
        raise OffsiteError(
            f"`peft` bitfit: the adapter blocks of this {model.config.model_type} model have no "
            "bias parameters; choose lora, ia3 or ln"
        )
    for p in trainable.values():
        p.requires_grad_(True)
    return sum(p.numel() for p in trainable.values())


def _own_parameters(peft: PeftOptions | None) -> str:
    """Which of the adapter blocks' own parameters train: all of them, or a method's (BitFit's biases)."""
    return "all" if peft is None else method_of(peft.method).own_parameters


def make_trainable(model: PreTrainedModel, bundle: Bundle, peft: PeftOptions | None):
    """The emulator ready to train: the adapter blocks, or PEFT modules inside them, trainable.
    Returns (the model to train, which may be a PeftModel; the number of trainable parameters)."""
    if peft is None or not method_of(peft.method).modules:
        return model, freeze_except_adapter(model, bundle, _own_parameters(peft))
    model = attach(model, peft, bundle.adapter_positions)
    return model, sum(p.numel() for p in model.parameters() if p.requires_grad)


def trained_adapter(model, bundle: Bundle, peft: PeftOptions | None) -> tuple[dict, dict]:
    """What the data owner returns from a trained `make_trainable` model: (tensors keyed by the
    full model's names, the matching `save_adapter` keywords)."""
    if peft is None or not method_of(peft.method).modules:
        trained = _own_parameters(peft)
        return extract_adapter(model, bundle, trained), {"trained": trained}
    return delta_state(model, bundle), {"peft": (peft.to_json(), full_config(peft, bundle))}


def round_schedule(cfg: TrainConfig, bundle: Bundle) -> TrainConfig:
    """For a federated round's bundle (round i of n), `cfg` as part i of one run over all n rounds:
    its learning-rate schedule and batch order continue where round i-1 left off. Any other
    bundle: `cfg`."""
    federation = bundle.manifest.get("federation")
    if not isinstance(federation, dict):
        return cfg
    part = (federation.get("round"), federation.get("rounds"))
    if not all(isinstance(x, int) for x in part) or not 0 <= part[0] < part[1]:
        raise OffsiteError(f"{bundle.path}: its federation record names no valid round ({part})")
    return replace(cfg, schedule_part=part)


def hold_frozen_weights(model: torch.nn.Module, cfg: TrainConfig, low_memory: bool = False) -> None:
    """Hold frozen weights in bf16 where that costs nothing. Not under DP-SGD (opacus's
    per-sample gradients follow the activations' dtype).

    Under bf16 mixed precision, every frozen weight (the emulator's middle, embeddings, the base
    weights under PEFT): autocast multiplies them in bf16 anyway and nothing updates them, so they
    need no float32 copy (half their memory); what trains keeps float32 master weights.

    With `low_memory`, in float32 with gradient checkpointing, also the frozen matrices of the
    blocks that a bf16 bundle gave (every value exactly a bf16): stored in bf16 and widened to
    float32 as each block runs, so the arithmetic is the float32 one, bit for bit. Only under
    checkpointing, where a block's widened copies are let go as soon as its forward (or its
    recomputation) is done (otherwise the backward pass would keep them all), and only with
    `allocator.limit_heap_growth`: under glibc's default the widened copies' churn fragments the
    heap, and the peak rose (1299 -> 1474 MiB) instead of falling."""
    if cfg.dp is not None:
        return
    if cfg.mixed_precision == "bf16":
        for p in model.parameters():
            if not p.requires_grad and p.dtype == torch.float32:
                p.data = p.data.to(torch.bfloat16)
    elif low_memory and cfg.mixed_precision == "no" and cfg.gradient_checkpointing:
        for block in get_blocks(causal_lm_of(model)):
            for module in list(block.modules()):
                if parametrize.is_parametrized(module):
                    continue
                # its own weight (PEFT's layers reach their base layer's)
                stored = _exact_bf16(module._parameters.get("weight"))
                if stored is not None:
                    parametrize.register_parametrization(module, "weight", _Widen(), unsafe=True)
                    module.parametrizations.weight.original.data = stored


def _exact_bf16(weight) -> torch.Tensor | None:
    """A frozen float32 matrix as bf16, if every value of it is a bf16 (else None)."""
    if not (
        isinstance(weight, torch.nn.Parameter)
        and not weight.requires_grad
        and weight.dtype == torch.float32
        and weight.dim() == 2
    ):
        return None
    stored = weight.data.to(torch.bfloat16)
    return stored if torch.equal(stored.float(), weight.data) else None


class _Widen(torch.nn.Module):
    """A weight stored in bf16, used in float32 (exact: every bf16 is a float32)."""

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.float()


@dataclass
class TrainedAdapter:
    """A trained emulator and what the data owner returns from it."""

    model: torch.nn.Module  # the emulator as trained (unwrapped from any accelerator)
    state: dict[str, torch.Tensor]  # keyed by the full model's names
    kind: dict  # the matching save_adapter keywords
    summary: dict  # the training loop's summary
    trainable: int  # trainable parameters
    peft: PeftOptions | None  # the options as resolved for this architecture


def train_adapter(
    bundle: Bundle,
    data: TokenData,
    cfg: TrainConfig,
    *,
    pad_id: int,
    peft: PeftOptions | None = None,
    low_memory: bool = False,
    run_key: dict | None = None,
    **train_kwargs,
) -> TrainedAdapter | None:
    """Load the bundle's emulator, make its adapter (or PEFT modules in it) trainable, train it on
    `data`; the one sequence `finetune` and the five-settings evaluation share. None on processes
    other than the main one. `train_kwargs` go to the training loop (validation, checkpoints...)."""
    torch.manual_seed(cfg.seed)
    model = bundle.load_model(dtype=torch.float32)
    check_bundle_model(bundle, model)
    options = peft.resolved(model.config.model_type) if peft else None
    model, n_trainable = make_trainable(model, bundle, options)
    hold_frozen_weights(model, cfg, low_memory=low_memory)
    log.info("training %d adapter parameters on %d examples", n_trainable, len(data))
    if run_key is not None:
        run_key = {**run_key, "peft": options.to_json() if options else None}
    summary = train(model, data, cfg, pad_id=pad_id, run_key=run_key, **train_kwargs)
    acc = train_kwargs.get("accelerator")
    if acc is not None and not acc.is_main_process:
        return None
    model = acc.unwrap_model(model) if acc is not None else model
    state, kind = trained_adapter(model, bundle, options)
    return TrainedAdapter(model, state, kind, summary, n_trainable, options)


def finetune_bundle(
    bundle: Bundle,
    job: FinetuneJob,
    cfg: TrainConfig,
    *,
    on_step: Callable[[StepInfo], None] | None = None,
    signer: Signer | None = None,
) -> Adapter | None:
    """Fine-tune the adapter of a verified bundle on local data; returns the adapter (main process)."""
    check_output_dir(job.out, job.overwrite)  # fail before hours of training, not after
    check_apart({"`out`": job.out, "`checkpoint_dir`": job.checkpoints}, {"`bundle`": bundle.path},
                {"`data`": job.data})  # fmt: skip
    check_apart({"`checkpoint_dir`": job.checkpoints}, {"`out`": job.out})
    check_writable(job.out)
    adapter_bytes = spec_bytes(spec_from_bundle(bundle))
    # the adapter, and with checkpoints its float32 master copy and two Adam moments as well
    check_free_space(
        job.out, adapter_bytes * (4 if cfg.save_every else 1) + (1 << 20), "the adapter"
    )
    if job.low_memory:
        limit_heap_growth()  # process-wide, before anything is loaded (once: `join` comes back)
    acc = make_accelerator(cfg)
    tokenizer = bundle.load_tokenizer()
    data = load_data(job.data, tokenizer, job.block_size)
    train_data, val_data = split_validation(data, job.val_fraction, cfg.seed)
    run = train_adapter(
        bundle, train_data, cfg, peft=job.peft, pad_id=pad_id_of(tokenizer), val_data=val_data,
        low_memory=job.low_memory, checkpoint_dir=job.checkpoints, resume=job.resume, on_step=on_step,
        accelerator=acc, run_key={"bundle_id": bundle.bundle_id, "block_size": job.block_size,
                                  "val_fraction": job.val_fraction},
    )  # fmt: skip
    if run is None:
        return None  # not the main process
    summary = {**run.summary, "trainable_parameters": run.trainable, "block_size": job.block_size,
               "data_file": job.data.name}  # fmt: skip
    state, kind = run.state, run.kind
    if (
        "peft" not in kind
    ):  # trained in float32, returned in the bundle's dtype (a delta stays float32)
        dtypes = spec_from_bundle(bundle)
        state = {k: v.to(getattr(torch, dtypes[k][0])) for k, v in state.items()}
    adapter = save_adapter(
        state, bundle, job.out, training=summary, overwrite=job.overwrite, signer=signer, **kind
    )
    if not job.keep_checkpoints:
        remove_checkpoints(job.checkpoints)
    return adapter
