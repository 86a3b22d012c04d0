"""Training checkpoints: trainable weights (safetensors), optimizer state and progress, for --resume."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from offsite.atomic import atomic_directory, write_json_atomic
from offsite.errors import OffsiteError

CHECKPOINT_FORMAT_VERSION = 1
LATEST = "latest"
BEST = "best"
MARKER = (
    "offsite_checkpoints.json"  # says the folder is ours: only then is anything removed from it
)
_OURS = (LATEST, BEST, MARKER)


def claim_checkpoint_dir(root: Path) -> None:
    """Make `root` a checkpoint folder of ours, refusing a non-empty folder that holds none."""
    if root.exists() and not root.is_dir():
        raise OffsiteError(
            f"{root}: exists and is not a directory; choose another `checkpoint_dir`"
        )
    if (
        root.is_dir()
        and not (root / MARKER).is_file()
        and any(map(_not_marker_write, root.iterdir()))
    ):
        raise OffsiteError(
            f"{root}: folder holds files that are not offsite checkpoints; choose an empty or new `checkpoint_dir`"
        )
    root.mkdir(parents=True, exist_ok=True)
    if not (root / MARKER).is_file():
        write_json_atomic(
            root / MARKER,
            {"format": "offsite-tuning/checkpoints", "format_version": CHECKPOINT_FORMAT_VERSION},
        )


def _not_marker_write(path: Path) -> bool:
    """False for another process's marker being written (write_json_atomic's temporary file)."""
    return not (path.name.startswith(f".{MARKER}.") and path.name.endswith(".tmp"))


def remove_checkpoints(root: Path) -> None:
    """Remove what our runs wrote into `root` (nothing else), and `root` itself once it is empty."""
    if not (root / MARKER).is_file():
        return
    for name in _OURS:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
    with contextlib.suppress(OSError):
        root.rmdir()  # only succeeds when nothing of anyone else's is left


class BestWeights:
    """The trainable weights with the lowest validation perplexity so far (also on disk, if a folder is given).

    A previous run's best weights are adopted only when resuming that same run (same run key).
    """

    def __init__(self, root: Path | None, run_key: dict, resume: bool) -> None:
        self.root, self.run_key = root, run_key
        self.state, self.step, self.perplexity = None, None, math.inf
        info_path = root / BEST / "best.json" if root is not None else None
        if resume and info_path is not None and info_path.is_file():
            info = json.loads(info_path.read_text())
            if info.get("run_key") == run_key:
                self.step, self.perplexity = info["step"], info["val_perplexity"]
                self.state = load_file(str(root / BEST / "weights.safetensors"))

    def offer(self, model: nn.Module, step: int, perplexity: float, is_main: bool) -> None:
        if not perplexity < self.perplexity:
            return
        self.step, self.perplexity = step, perplexity
        self.state = {
            n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad
        }
        if self.root is not None and is_main:
            with atomic_directory(self.root / BEST, overwrite=True) as tmp:
                save_file(self.state, str(tmp / "weights.safetensors"))
                write_json_atomic(
                    tmp / "best.json",
                    {"step": step, "val_perplexity": perplexity, "run_key": self.run_key},
                )

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, value in (self.state or {}).items():
            params[name].copy_(value)


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
