"""`owner serve`: run the gRPC service until SIGINT/SIGTERM."""

from __future__ import annotations

import json
import logging
import signal
import threading

from offsite.exchange.home import OwnerHome
from offsite.exchange.service import OwnerService
from offsite.transport.server import start_server


def serve(
    home: OwnerHome, listen: str, *, insecure: bool = False, chunk_bytes: int = 1 << 20
) -> None:
    """Serve until interrupted; prints one JSON line with the bound address first."""
    logging.getLogger("offsite").setLevel(logging.INFO)  # one log line per request, with the caller
    if insecure:
        print(
            "WARNING: --insecure-dev: NO TLS and NO AUTHENTICATION. Never use this outside local testing.",
            flush=True,
        )
    service = OwnerService(home, chunk_bytes=chunk_bytes)
    server, port = start_server(service, listen, insecure=insecure)
    host = listen.rsplit(":", 1)[0]
    print(json.dumps({"listening": f"{host}:{port}", "tls": not insecure}), flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=5).wait()
    service.close()
