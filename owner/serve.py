"""`owner serve`: run the gRPC service until SIGINT/SIGTERM."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path

from offsite.recipes.serve import serve as run_server


def serve(home: Path, listen: str, *, insecure: bool = False, chunk_bytes: int = 1 << 20) -> None:
    """Serve until interrupted; prints one JSON line with the bound address first."""
    logging.getLogger("offsite").setLevel(logging.INFO)  # one log line per request, with the caller
    if insecure:
        print(  # stderr: stdout carries only the JSON line below
            "WARNING: --insecure-dev: NO TLS and NO AUTHENTICATION. Never use this outside local testing.",
            file=sys.stderr,
            flush=True,
        )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def ready(address: str) -> None:
        print(json.dumps({"listening": address, "tls": not insecure}), flush=True)

    run_server(home, listen, stop, insecure=insecure, chunk_bytes=chunk_bytes, on_ready=ready)
