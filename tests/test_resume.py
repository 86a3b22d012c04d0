"""Cut the connection mid-transfer by killing the server process; the transfer resumes byte-identical."""

from __future__ import annotations

import threading
import time

import pytest
from exchange_env import ServerProcess, make_env, untrained_adapter

from offsite.atomic import sha256_file
from offsite.exchange.protocol import ADAPTER_FILES
from offsite.transport.client import connect

CHUNK = 16 << 10


class KillOnce:
    """on_bytes callback: after `after` bytes, kill -9 the server and start it again a moment later."""

    def __init__(self, server: ServerProcess, after: int) -> None:
        self.server, self.after, self.seen, self.killed = server, after, 0, False
        self.restarted = threading.Event()

    def __call__(self, n: int) -> None:
        self.seen += n
        if not self.killed and self.seen >= self.after:
            self.killed = True
            self.server.kill()
            threading.Thread(target=self._restart).start()

    def _restart(self) -> None:
        time.sleep(1.0)
        self.server.start()
        self.restarted.set()


@pytest.fixture
def served(tmp_path):
    home, creds, bundles = make_env(tmp_path, ["acme"])
    server = ServerProcess(home, chunk_bytes=CHUNK)
    address = server.start()
    yield home, creds["acme"], bundles["acme"], server, address
    server.stop()


def test_download_resumes_after_the_server_is_killed(served, tmp_path):
    home, creds, bundle, server, address = served
    total = sum((bundle.path / f).stat().st_size for f in bundle.manifest["files"])
    assert total > 8 * CHUNK, "the bundle must span many chunks"
    killer = KillOnce(server, after=3 * CHUNK)
    received = []
    with connect(address, creds, chunk_bytes=CHUNK) as client:
        client.fetch_bundle(
            bundle.bundle_id, tmp_path / "got", on_bytes=lambda n: (received.append(n), killer(n))
        )
    assert killer.killed and killer.restarted.is_set()
    assert sum(received) < total + 2 * CHUNK, "resumed from the committed offset, not from zero"
    for name in (tmp_path / "got").iterdir():
        assert sha256_file(name) == sha256_file(bundle.path / name.name), name


def test_upload_resumes_after_the_server_is_killed(served, tmp_path):
    home, creds, bundle, server, address = served
    adapter = untrained_adapter(bundle, creds, tmp_path / "adapter")
    size = sum((adapter / n).stat().st_size for n in ADAPTER_FILES["blocks"])
    assert size > 4 * CHUNK
    killer = KillOnce(server, after=2 * CHUNK)
    sent = []
    with connect(address, creds, chunk_bytes=CHUNK) as client:
        result = client.submit_adapter(adapter, on_bytes=lambda n: (sent.append(n), killer(n)))
    assert killer.killed and result["status"] == "verified"
    assert sum(sent) < size + 4 * CHUNK, "resumed from the committed offset, not from zero"
    with home.registry() as registry:
        assert registry.upload(result["upload_id"])["state"] == "committed"
    stored = home.adapters / result["adapter_id"]
    for name in ADAPTER_FILES["blocks"]:
        assert sha256_file(stored / name) == sha256_file(adapter / name), name
