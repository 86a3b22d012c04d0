"""Several data owners: FedAvg rounds over the exchange (owner side; no networking here).

Each round the owner issues every member a signed bundle carrying the current adapter (round 0:
the base bundle's own), the members fetch, fine-tune and submit through the server as usual, and
`advance` counts the verified adapters trained from *this round's* bundles, closes the round at
a quorum or after a deadline (members that did not submit are recorded as stragglers), and
averages the adapters weighted by the tokens each member signed that it trained on. All state is
in the owner home's registry, so a restarted owner resumes the round it was in.

What a member can claim: the owner cannot check how many tokens a member trained on, only that
the member signed the count. A count that is not a whole number from 1 to MAX_TOKENS refuses
the adapter when it arrives (the member may send another); and no member's weight exceeds
`max_weight_ratio` times the smallest count received in that round, so a member claiming 10^12
tokens against another's 4,096 counts only that many times more. A revoked member is left out of
the rounds after its revocation, and the round no longer waits for it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from offsite.artefacts.adapter import (
    Adapter,
    open_adapter,
    remap_blocks,
    save_adapter,
    verify_adapter_for_bundle,
)
from offsite.artefacts.bundle import Bundle, open_bundle, write_bundle_files
from offsite.artefacts.shards import copy_with
from offsite.artefacts.signing import Signer
from offsite.errors import OffsiteError
from offsite.exchange.home import OwnerHome, active_data_owner, check_name, register_bundle

AGGREGATE = "aggregate"
MAX_TOKENS = 10**15  # a claimed token count above this is refused (and fits SQLite's integers)


@dataclass(frozen=True)
class FederationSpec:
    """Who takes part, for how many rounds, and when a round closes."""

    name: str
    base_bundle: Path
    model: str
    members: tuple[str, ...]
    rounds: int
    quorum: int = 0  # 0: every member
    deadline_s: float = 3600.0
    max_weight_ratio: float = 4.0  # no member weighs more than this times the smallest claim

    def __post_init__(self) -> None:
        check_name(self.name)
        if not self.members or len(set(self.members)) != len(self.members):
            raise OffsiteError("`members`: name each enrolled data owner once")
        if self.rounds < 1 or not 0 <= self.quorum <= len(self.members):
            raise OffsiteError(
                "`rounds` must be >= 1 and `quorum` between 1 and the number of members"
            )
        if not (math.isfinite(self.deadline_s) and self.deadline_s > 0):
            raise OffsiteError(
                f"`deadline_s` must be a positive number of seconds (got {self.deadline_s})"
            )
        if not (math.isfinite(self.max_weight_ratio) and self.max_weight_ratio >= 1):
            raise OffsiteError(
                f"`max_weight_ratio` must be a number >= 1 (got {self.max_weight_ratio})"
            )

    @property
    def needed(self) -> int:
        return self.quorum or len(self.members)


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    """The weighted mean of adapter states with the same keys (float32 sums, each tensor's dtype kept)."""
    if not states or len(states) != len(weights) or min(weights) <= 0:
        raise OffsiteError("FedAvg needs one positive weight per adapter")
    total = float(sum(weights))
    return {k: sum(s[k].float() * (w / total) for s, w in zip(states, weights, strict=True)).to(states[0][k].dtype)
            for k in states[0]}  # fmt: skip


def claimed_tokens(adapter: Adapter) -> int:
    """The token count an adapter's signed manifest claims, if it can weigh in a round."""
    training = adapter.manifest.get("training")
    tokens = training.get("tokens_this_run") if isinstance(training, dict) else None
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= MAX_TOKENS:
        raise OffsiteError(
            f"training.tokens_this_run {tokens!r} is not a whole number of tokens from 1 to {MAX_TOKENS}"
        )
    return tokens


def check_round_adapter(adapter: Adapter) -> int:
    """Refuse an adapter a round cannot average (PEFT, partly trained, no sound token count); its tokens."""
    if adapter.kind != "blocks" or adapter.trained != "all":
        raise OffsiteError("a federation round averages whole adapter blocks; train without PEFT")
    return claimed_tokens(adapter)


def capped(tokens: list[int], ratio: float) -> list[int]:
    """Each claim, at most `ratio` times the smallest one: no member outweighs another by more."""
    cap = int(min(tokens) * ratio)
    return [min(t, cap) for t in tokens]


def round_dir(home: OwnerHome, name: str, round_: int) -> Path:
    return home.root / "federations" / name / f"round-{round_}"


def start(home: OwnerHome, spec: FederationSpec) -> None:
    """Record a new federation, or find the same one again to resume it (with fewer members, if
    the owner leaves some out: the rounds from now on go on without them)."""
    open_bundle(spec.base_bundle)
    data = {
        **asdict(spec),
        "base_bundle": str(Path(spec.base_bundle).resolve()),
        "members": list(spec.members),
    }
    with home.registry() as registry:
        existing = registry.federation(spec.name)
    if existing is None:
        for member in spec.members:
            active_data_owner(home, member)
        with home.registry() as registry:
            registry.add_federation(spec.name, data, time.time())
        return
    old = {**existing["spec"], "max_weight_ratio": existing["spec"].get("max_weight_ratio", 4.0)}
    same = {k: v for k, v in old.items() if k != "members"} == {
        k: v for k, v in data.items() if k != "members"
    }
    if not same or not set(spec.members) <= set(old["members"]):
        raise OffsiteError(f"federation {spec.name!r} exists with other settings (a resumed one may only "
                           "leave members out); choose another name")  # fmt: skip
    if spec.members != tuple(old["members"]):
        with home.registry() as registry:
            registry.set_federation_spec(spec.name, data)


def federate(home: OwnerHome, spec: FederationSpec, *, poll_s: float = 5.0, once: bool = False,
             on_status: Callable[[dict], None] | None = None) -> dict:  # fmt: skip
    """`owner federate`: start (or resume) the federation and advance it until it is finished
    (`once`: a single step); returns where it stands."""
    if not (math.isfinite(poll_s) and poll_s > 0):
        raise OffsiteError(f"`poll_s` must be a positive number of seconds (got {poll_s})")
    start(home, spec)
    while True:
        status = advance(home, spec.name)
        if on_status:
            on_status(status)
        if once or status["state"] == "finished":
            return status
        if status["state"] == "waiting":
            time.sleep(poll_s)


def advance(home: OwnerHome, name: str, now: float | None = None) -> dict:
    """Do what the federation's state calls for now; returns where it stands."""
    now = time.time() if now is None else now
    with home.registry() as registry:
        fed = registry.federation(name)
    if fed is None:
        raise OffsiteError(f"no federation {name!r} in {home.root}")
    spec = FederationSpec(**{**fed["spec"], "base_bundle": Path(fed["spec"]["base_bundle"]),
                             "members": tuple(fed["spec"]["members"])})  # fmt: skip
    r = fed["round"]
    if fed["state"] == "finished":
        return _status(home, spec, r, "finished")
    active = _active_members(home, spec)
    with home.registry() as registry:
        entries = registry.member_rounds(name, r)
    if not entries:
        _issue_round(home, spec, r, active)
        return _status(home, spec, r, "issued")
    received = _collect(home, name, r, entries, active)
    needed = min(spec.needed, sum(e["data_owner"] in active for e in entries))
    if len(received) >= max(needed, 1) or (
        received and now - fed["round_started"] > spec.deadline_s
    ):
        _close_round(home, spec, r, received)
        last = r + 1 == spec.rounds
        with home.registry() as registry:
            registry.set_federation(
                name, r if last else r + 1, now, "finished" if last else "running"
            )
        return _status(home, spec, r, "finished" if last else "closed")
    return _status(home, spec, r, "waiting")


def _active_members(home: OwnerHome, spec: FederationSpec) -> set[str]:
    """The members still enrolled and not revoked; an error when none is left."""
    with home.registry() as registry:
        owners = {m: registry.data_owner(m) for m in spec.members}
    active = {m for m, o in owners.items() if o is not None and o.revoked_at is None}
    if not active:
        raise OffsiteError(
            f"federation {spec.name!r}: every member is revoked; nothing can continue"
        )
    return active


def _status(home: OwnerHome, spec: FederationSpec, r: int, state: str) -> dict:
    with home.registry() as registry:
        members = registry.member_rounds(spec.name, r)
    return {"federation": spec.name, "round": r, "rounds": spec.rounds, "state": state,
            "members": {m["data_owner"]: m["status"] for m in members},
            "notes": {m["data_owner"]: m["note"] for m in members if m.get("note")},
            "aggregate": str(round_dir(home, spec.name, r) / AGGREGATE) if state in ("closed", "finished") else None}  # fmt: skip


def _issue_round(home: OwnerHome, spec: FederationSpec, r: int, active: set[str]) -> None:
    """Every member's signed bundle for round `r`, carrying the previous round's aggregate."""
    base = open_bundle(spec.base_bundle)
    state = None
    if r > 0:
        previous = open_adapter(round_dir(home, spec.name, r - 1) / AGGREGATE)
        state = verify_adapter_for_bundle(previous, base)
    signer = Signer("model-owner", home.signing_key)
    for member in (m for m in spec.members if m in active):
        extra = {
            "issued_to": member,
            "federation": {"name": spec.name, "round": r, "rounds": spec.rounds},
        }
        bundle = write_round_bundle(
            base, state, round_dir(home, spec.name, r) / member, signer, extra
        )
        register_bundle(home, bundle, member, spec.model)
        with home.registry() as registry:
            registry.add_member_round(spec.name, r, member, bundle.bundle_id)


def write_round_bundle(base: Bundle, state: dict[str, torch.Tensor] | None, out: Path, signer: Signer,
                       extra: dict) -> Bundle:  # fmt: skip
    """`base` with its adapter blocks replaced by `state` (full-model names), re-signed, atomically."""
    prefix = base.manifest["base_model"]["block_prefix"]
    position = dict(zip(base.adapter_sources, base.adapter_positions, strict=True))
    replacements = remap_blocks(state or {}, prefix, position)
    manifest = {k: v for k, v in base.manifest.items() if k != "files"} | extra
    return write_bundle_files(lambda tmp: copy_with(base.path, tmp, replacements), None, manifest, out,
                              overwrite=True, signer=signer)  # fmt: skip


def _collect(
    home: OwnerHome, name: str, r: int, entries: list[dict], active: set[str]
) -> list[dict]:
    """Mark the members whose sound, verified adapter for this round's bundle has arrived (revoked
    members as revoked; an adapter a round cannot use is noted and the member may send another)."""
    with home.registry() as registry:
        verified = [a for a in registry.adapters() if a["status"] == "verified"]
        for e in entries:
            if e["status"] == "issued" and e["data_owner"] not in active:
                registry.set_member_round(name, r, e["data_owner"], "revoked")
                continue
            if e["status"] != "issued":
                continue
            for a in verified:  # oldest first: the first sound one counts
                if a["bundle_id"] != e["bundle_id"] or a["data_owner"] != e["data_owner"]:
                    continue
                try:
                    tokens = check_round_adapter(open_adapter(a["path"]))
                except OffsiteError as err:
                    registry.note_member_round(
                        name, r, e["data_owner"], f"adapter {a['adapter_id']} refused: {err}"
                    )
                    continue
                registry.set_member_round(
                    name, r, e["data_owner"], "received", a["adapter_id"], tokens
                )
                break
        return [m for m in registry.member_rounds(name, r) if m["status"] == "received"]


def _close_round(home: OwnerHome, spec: FederationSpec, r: int, received: list[dict]) -> Adapter:
    """FedAvg of the received adapters (each re-checked against its round bundle), saved signed."""
    states, weights = [], []
    with home.registry() as registry:
        for m in received:
            record = registry.adapter_exact(m["adapter_id"])
            bundle = open_bundle(registry.bundle(m["bundle_id"])["path"])
            states.append(verify_adapter_for_bundle(open_adapter(record["path"]), bundle))
            weights.append(m["tokens"])
        for m in registry.member_rounds(spec.name, r):
            if m["status"] == "issued":
                registry.set_member_round(spec.name, r, m["data_owner"], "straggler")
    counted = capped(weights, spec.max_weight_ratio)
    training = {"federation": {"name": spec.name, "round": r,
                               "members": {m["data_owner"]: m["tokens"] for m in received},
                               "weights": {m["data_owner"]: w for m, w in zip(received, counted, strict=True)},
                               "max_weight_ratio": spec.max_weight_ratio}}  # fmt: skip
    return save_adapter(fedavg(states, counted), open_bundle(spec.base_bundle), round_dir(home, spec.name, r) / AGGREGATE,
                        training=training, overwrite=True, signer=Signer("model-owner", home.signing_key))  # fmt: skip
