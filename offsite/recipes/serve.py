"""`owner serve`: the gRPC service over a home's bundles and uploads, until `stop` is set."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from offsite.exchange.home import open_home


def serve(
    home: Path,
    listen: str,
    stop: threading.Event,
    *,
    insecure: bool = False,
    chunk_bytes: int = 1 << 20,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve `home` on `listen` (host:port; port 0 picks one, `on_ready` hears the bound address)."""
    from offsite.transport.server import serve as run_server

    run_server(
        open_home(home), listen, stop, insecure=insecure, chunk_bytes=chunk_bytes, on_ready=on_ready
    )
