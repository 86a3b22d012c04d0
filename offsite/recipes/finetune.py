"""`data-owner finetune`: verify a bundle (from a folder or the owner's server), train its adapter
on local data, sign it, and (from a server) submit it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from offsite.errors import OffsiteError
from offsite.recipes.identity import credentials_of, signer_of, verified_bundle
from offsite.recipes.remote import Remote, connected
from offsite.training.config import StepInfo, TrainConfig
from offsite.training.finetune import FinetuneJob, finetune_bundle


@dataclass(frozen=True)
class FinetuneSpec:
    """Where the bundle comes from (`bundle`, a folder, or `remote`), what to train, with which
    credentials (they verify the bundle and sign the adapter)."""

    job: FinetuneJob
    train: TrainConfig = field(default_factory=TrainConfig)
    bundle: Path | None = None
    remote: Remote | None = None
    credentials: Path | None = None
    bundle_id: str | None = None  # with `remote`: which issued bundle (default: the newest)
    bundle_dir: Path | None = None  # with `remote`: where it is downloaded (default OUT.bundle)

    def __post_init__(self) -> None:
        if (self.bundle is None) == (self.remote is None):
            raise OffsiteError("give exactly one of `bundle` (a folder) or `remote` (a server)")
        if self.remote and not (self.credentials or self.remote.insecure_identity):
            raise OffsiteError("`remote` needs `credentials`")

    @property
    def download(self) -> Path:
        out = self.job.out
        return self.bundle_dir or out.with_name(out.name + ".bundle")


def finetune(
    spec: FinetuneSpec,
    *,
    on_step: Callable[[StepInfo], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> dict | None:
    """What was trained (adapter, steps, losses, DP record) and, from a server, the owner's verdict
    on it; None in the processes of a multi-process run but the main one."""
    creds = credentials_of(spec.credentials)  # read once: it verifies, signs and connects
    signer = signer_of(creds, spec.credentials)
    if spec.bundle is not None:
        bundle = verified_bundle(spec.bundle, creds)
    elif spec.download.exists():  # a previous download: checked like a fresh one
        bundle = verified_bundle(spec.download, creds)
    else:
        from offsite.transport.client import fetch

        with connected(spec.remote, creds) as owner:
            bundle = fetch(
                owner, spec.bundle_id, spec.download, on_bytes=on_bytes, on_total=on_total
            )
    adapter = finetune_bundle(bundle, spec.job, spec.train, on_step=on_step, signer=signer)
    if adapter is None:
        return None
    t = adapter.manifest["training"]
    result = {"adapter": str(adapter.path), "bundle_id": bundle.bundle_id, "steps": t["steps"],
              "final_loss": t["final_loss"], "val_perplexity": t["val_perplexity"],
              "differential_privacy": t.get("differential_privacy")}  # fmt: skip
    if spec.remote is not None:
        from offsite.transport.client import submit

        with connected(spec.remote, creds) as owner:
            result["submitted"] = submit(owner, adapter.path)
    return result
