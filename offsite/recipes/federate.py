"""`owner federate`: run (or resume) FedAvg rounds: issue each round's bundles, wait for the
members' adapters, average them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from offsite.exchange.federation import FederationSpec, federate
from offsite.exchange.home import open_home

__all__ = ["FederationSpec", "federate_rounds"]


def federate_rounds(
    home: Path,
    spec: FederationSpec,
    *,
    poll_s: float = 5.0,
    once: bool = False,
    on_status: Callable[[dict], None] | None = None,
) -> dict:
    """Where the federation stands when it is finished (`once`: after a single step)."""
    return federate(open_home(home), spec, poll_s=poll_s, once=once, on_status=on_status)
