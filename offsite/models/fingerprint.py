"""Base-model fingerprint: a sha256 over every tensor's name, dtype, shape and bytes."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """'sha256:<hex>' identifying these exact weights, independent of file layout."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name]
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(_tensor_bytes(t))
    return "sha256:" + digest.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """Fingerprint of a model's state dict (tied weights counted under each name)."""
    return state_fingerprint(model.state_dict())
