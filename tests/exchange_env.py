"""An owner home with enrolled data owners and signed tiny bundles, and servers to talk to it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from tiny import DEPTH, save_tiny

from offsite.artefacts.adapter import extract_adapter, save_adapter
from offsite.artefacts.bundle import Bundle
from offsite.artefacts.signing import Signer, load_private
from offsite.emulator.package import package_emulator
from offsite.emulator.plan import make_plan
from offsite.exchange.credentials import Credentials
from offsite.exchange.home import OwnerHome, enroll, init_home, register_bundle
from offsite.exchange.service import OwnerService, ServiceLimits
from offsite.models.loading import load_model, load_tokenizer
from offsite.transport.server import start_server

ROOT = Path(__file__).resolve().parents[1]


def issue_bundle(home: OwnerHome, model_dir: Path, name: str, out: Path) -> Bundle:
    """Package a signed tiny bundle for data owner `name` and register it."""
    bundle = package_emulator(load_model(str(model_dir)), load_tokenizer(str(model_dir)), make_plan(DEPTH, emulator_layers=2),
                              out, base_name=str(model_dir), signer=Signer("model-owner", home.signing_key),
                              extra={"issued_to": name}, inplace=True)  # fmt: skip
    register_bundle(home, bundle, name, str(model_dir))
    return bundle


def make_env(
    root: Path, names: list[str]
) -> tuple[OwnerHome, dict[str, Credentials], dict[str, Bundle]]:
    home = init_home(root / "home", [])
    save_tiny("llama", root / "model")
    creds, bundles = {}, {}
    for name in names:
        creds[name] = enroll(home, name)
        bundles[name] = issue_bundle(home, root / "model", name, root / f"bundle-{name}")
    return home, creds, bundles


def signer_of(creds: Credentials) -> Signer:
    return Signer(creds.name, load_private(creds.signing_key.encode(), "test"))


def untrained_adapter(bundle: Bundle, creds: Credentials, out: Path) -> Path:
    """A signed adapter straight from the bundle's own adapter blocks (no training needed)."""
    save_adapter(
        extract_adapter(bundle.load_model(), bundle),
        bundle,
        out,
        training={},
        signer=signer_of(creds),
    )
    return out


@contextmanager
def thread_server(home: OwnerHome, chunk_bytes: int = 1 << 20, limits: ServiceLimits | None = None):
    service = OwnerService(home, chunk_bytes=chunk_bytes, limits=limits)
    server, port = start_server(service, "127.0.0.1:0")
    try:
        yield f"localhost:{port}"
    finally:
        server.stop(None)
        service.close()


class ServerProcess:
    """`owner serve` in a child process, which a test can kill -9 and start again on the same port."""

    def __init__(self, home: OwnerHome, chunk_bytes: int) -> None:
        self.home, self.chunk_bytes, self.port, self.proc = home, chunk_bytes, 0, None

    def start(self) -> str:
        cmd = [sys.executable, "-m", "owner.cli", "serve", "--home", str(self.home.root),
               "--listen", f"127.0.0.1:{self.port}", "--chunk-bytes", str(self.chunk_bytes)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        line = self.proc.stdout.readline()
        self.port = int(json.loads(line)["listening"].rsplit(":", 1)[1])
        return f"localhost:{self.port}"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
