"""`data-owner join`: take part in the owner's federated rounds (fetch, verify, fine-tune, sign,
submit, repeat); each round's training is the `finetune` recipe's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from offsite.artefacts.bundle import Bundle
from offsite.errors import OffsiteError
from offsite.recipes.identity import credentials_of, signer_of
from offsite.recipes.remote import Remote, connected
from offsite.training.config import StepInfo, TrainConfig
from offsite.training.finetune import FinetuneJob, finetune_bundle, round_schedule

SCHEDULES = ("continue", "restart")


@dataclass(frozen=True)
class JoinSpec:
    """`rounds` rounds with `remote`, each trained as `job` says (its `out` and `checkpoint_dir`
    are per round: WORK/round-K, CHECKPOINT_DIR/round-K)."""

    remote: Remote
    credentials: Path
    rounds: int
    work: Path
    job: FinetuneJob
    train: TrainConfig = field(default_factory=TrainConfig)
    # continue: one run spread over the rounds (schedule and batch order go on); restart: each
    # round its own full schedule
    round_schedule: str = "continue"
    poll_s: float = 10.0
    wait_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.round_schedule not in SCHEDULES:
            raise OffsiteError(f"`round_schedule` {self.round_schedule!r} unknown; choose one of {', '.join(SCHEDULES)}")  # fmt: skip


def join_rounds(spec: JoinSpec, *, on_step: Callable[[StepInfo], None] | None = None,
                on_round: Callable[[int, int], None] | None = None) -> list[dict]:  # fmt: skip
    """Each round taken part in: its bundle, adapter and the owner's verdict (WORK/join.json
    keeps them, so a restart carries on). `on_round(k, n)` hears round k (from 1) of the
    federation's n as its training starts."""
    from offsite.transport.join import join

    creds = credentials_of(spec.credentials)
    if creds is None:
        raise OffsiteError("`credentials` are needed: the adapters a member submits are signed")
    signer = signer_of(creds, spec.credentials)
    checkpoints = spec.job.checkpoint_dir

    def train(bundle: Bundle, out: Path) -> Path:
        creds.check_bundle(bundle)  # signed by the owner we enrolled with, issued to us
        federation = bundle.manifest.get("federation") or {}
        if on_round is not None and isinstance(federation.get("round"), int):
            on_round(federation["round"] + 1, federation.get("rounds", spec.rounds))
        cfg = (
            round_schedule(spec.train, bundle) if spec.round_schedule == "continue" else spec.train
        )
        # a round's adapter folder never exists when it trains (join skips a trained round), so
        # nothing is overwritten; each round has its own checkpoint folder, which `resume` continues
        job = replace(spec.job, out=out, checkpoint_dir=checkpoints / out.name if checkpoints else None,
                      overwrite=False)  # fmt: skip
        return finetune_bundle(bundle, job, cfg, on_step=on_step, signer=signer).path

    with connected(spec.remote, creds) as owner:
        return join(owner, spec.rounds, spec.work, train, poll_s=spec.poll_s, wait_s=spec.wait_s)
