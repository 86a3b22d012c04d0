"""Training checkpoints: trainable weights (safetensors), optimizer state and progress, for --resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from offsite.atomic import atomic_directory, write_json_atomic
from offsite.errors import OffsiteError

CHECKPOINT_FORMAT_VERSION = 1
LATEST = "latest"


def save_checkpoint(
    root: Path, model: nn.Module, optimizer, scheduler, state: dict[str, Any]
) -> Path:
    """Replace `root/latest` with the current trainable weights, optimizer/scheduler state and `state`."""
    root.mkdir(parents=True, exist_ok=True)
    trainable = {
        n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad
    }
    with atomic_directory(root / LATEST, overwrite=True) as tmp:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(),
            },
            tmp / "optimizer.pt",
        )
        write_json_atomic(
            tmp / "state.json", {"format_version": CHECKPOINT_FORMAT_VERSION, **state}
        )
    return root / LATEST


def read_checkpoint_state(root: Path) -> dict[str, Any] | None:
    """The progress record of `root/latest`, or None if there is no checkpoint."""
    path = root / LATEST / "state.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise OffsiteError(
            f"{path}: corrupted checkpoint ({e}); delete {root} to start over"
        ) from None
    if state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise OffsiteError(
            f"{path}: checkpoint format_version {state.get('format_version')!r} is not supported"
        )
    return state


@torch.no_grad()
def load_checkpoint(root: Path, model: nn.Module, optimizer, scheduler) -> None:
    """Restore trainable weights, optimizer and scheduler state from `root/latest` (local files only)."""
    weights = load_file(str(root / LATEST / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(params):
        raise OffsiteError(
            f"{root / LATEST}: checkpoint holds other parameters than this run trains; delete {root} to start over"
        )
    for name, value in weights.items():
        params[name].copy_(value)
    blob = torch.load(root / LATEST / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"])
