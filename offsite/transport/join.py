"""`data-owner join`: take part in federated rounds over the exchange (fetch, fine-tune, submit)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from offsite.artefacts.bundle import Bundle, open_bundle
from offsite.atomic import write_bytes_atomic
from offsite.errors import OffsiteError
from offsite.transport.client import OwnerClient


def join(
    owner: OwnerClient,
    rounds: int,
    work: Path,
    train: Callable[[Bundle, Path], Path],
    *,
    poll_s: float = 10.0,
    wait_s: float = 3600.0,
) -> list[dict]:
    """`data-owner join`: take part in `rounds` federated rounds. Each round: wait for the newest
    bundle issued to us that we have not trained on (start it after the owner issued round 0), fetch it, `train(bundle, out)` (returns the signed
    adapter's directory), submit. Progress is kept in WORK/join.json, so a restart carries on."""
    if rounds < 1:
        raise OffsiteError(f"`rounds` must be >= 1 (got {rounds})")
    for flag, value in (("`poll_s`", poll_s), ("`wait_s`", wait_s)):
        if not (math.isfinite(value) and value > 0):
            raise OffsiteError(f"{flag} must be a positive number of seconds (got {value})")
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "join.json"
    done = json.loads(log_path.read_text()) if log_path.is_file() else []
    while len(done) < rounds:
        k = len(done)
        info = _next_bundle(owner, {d["bundle_id"] for d in done}, poll_s, wait_s)
        bundle_dir = work / f"round-{k}.bundle"
        bundle = (
            open_bundle(bundle_dir)
            if bundle_dir.is_dir()
            else owner.fetch_bundle(info["bundle_id"], bundle_dir)
        )
        if bundle.bundle_id != info["bundle_id"]:
            raise OffsiteError(f"{bundle_dir}: holds another bundle; remove it and run again")
        adapter_dir = work / f"round-{k}"
        if not adapter_dir.is_dir():
            train(bundle, adapter_dir)
        result = owner.submit_adapter(adapter_dir)
        done.append({"round": k, "bundle_id": bundle.bundle_id, "federation": bundle.manifest.get("federation"),
                     "adapter": str(adapter_dir), **result})  # fmt: skip
        write_bytes_atomic(log_path, (json.dumps(done, indent=2) + "\n").encode())
    return done


def _next_bundle(owner: OwnerClient, seen: set[str], poll_s: float, wait_s: float) -> dict:
    """The newest listed bundle not in `seen` (a round we missed is not worth training for),
    waiting for the owner to issue one."""
    deadline = time.monotonic() + wait_s
    while True:
        fresh = [b for b in owner.list_bundles() if b["bundle_id"] not in seen]
        if fresh:
            return fresh[-1]
        if time.monotonic() > deadline:
            raise OffsiteError(
                f"no new bundle from the model owner within {wait_s:g} s; run `data-owner join` again to keep waiting"
            )
        time.sleep(poll_s)
