"""`owner merge-adapter`: verify a returned adapter and plug it into the full model; with a home,
the registry says whose key checks it and which bundle and model it belongs to."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from offsite.artefacts.merge import MergeSpec, merge
from offsite.artefacts.signing import load_public_file
from offsite.errors import OffsiteError
from offsite.models.loading import DEFAULT_MODEL


@dataclass(frozen=True)
class MergeRequest:
    """`adapter` (a folder, or with `home` an adapter id from the registry) into `model`, written
    to `out`. Without `home`, `bundle` is required and `signer_key` (or `allow_unsigned`)."""

    adapter: str
    out: Path
    bundle: Path | None = None
    model: str | None = None  # default: the registry's record (with home), else the default model
    home: Path | None = None
    signer_key: Path | None = None
    allow_unsigned: bool = False
    allow_revoked: bool = False  # with home: merge an adapter whose signer was revoked
    dtype: torch.dtype | None = None
    overwrite: bool = False


def merge_adapter(req: MergeRequest) -> dict:
    """The merge record (what was verified, and where the merged model is)."""
    signer, revoked = None, None
    if req.home is not None:
        from offsite.exchange.home import merge_inputs, open_home

        found = merge_inputs(open_home(req.home), req.adapter, req.bundle, req.allow_revoked)
        adapter, bundle, key, model = found.adapter, found.bundle, found.key, found.model
        signer, revoked = found.signer, found.signer_revoked_at
    elif req.allow_revoked:
        raise OffsiteError(
            "`allow_revoked` goes with `home`: only the registry knows who is revoked"
        )
    elif req.bundle is None:
        raise OffsiteError(
            "`bundle` is required without `home`: the adapter is checked against the blocks the bundle made trainable"
        )
    else:
        adapter, bundle, model = Path(req.adapter), req.bundle, DEFAULT_MODEL
        key = load_public_file(req.signer_key) if req.signer_key else None
    return merge(MergeSpec(adapter=adapter, bundle=bundle, out=req.out, model=req.model or model, signer_key=key,
                           allow_unsigned=req.allow_unsigned, dtype=req.dtype, overwrite=req.overwrite,
                           signer=signer, signer_revoked_at=revoked))  # fmt: skip
