"""Benchmark: stream a large bundle over loopback with mutual TLS, next to a plain file copy.

    python -m scripts.bench_transport                 # 64 MiB and 512 MiB bundles

The server (`owner serve`) and the client each run in their own process; memory growth is each
process's peak RSS (VmHWM) minus its RSS just before the transfer. Prints one JSON line per size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kib(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def _reset_peak(pid: int | str) -> None:
    # writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _make_bundle(work: Path, size: int):
    """An owner home with one signed, registered bundle carrying a `size`-byte payload file."""
    from offsite.artefacts.bundle import MANIFEST_NAME, SIGNATURE_NAME
    from offsite.artefacts.manifest import hash_files
    from offsite.artefacts.signing import Signer
    from offsite.emulator.package import package_emulator
    from offsite.emulator.plan import make_plan
    from offsite.exchange.home import enroll, init_home, register_bundle
    from offsite.models.loading import load_model, load_tokenizer
    from offsite.models.tiny import save_tiny

    home = init_home(work / "home", [])
    creds = enroll(home, "bench")
    save_tiny("llama", work / "model")
    bundle = package_emulator(load_model(str(work / "model")), load_tokenizer(str(work / "model")), make_plan(8, emulator_layers=2),
                              work / "bundle", base_name="tiny", extra={"issued_to": "bench"})  # fmt: skip
    with open(bundle.path / "payload.bin", "wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
    manifest = json.loads((bundle.path / MANIFEST_NAME).read_text())
    manifest["files"] = hash_files(bundle.path, (MANIFEST_NAME, SIGNATURE_NAME))
    (bundle.path / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    Signer("model-owner", home.signing_key).sign(
        bundle.path / MANIFEST_NAME, bundle.path / SIGNATURE_NAME
    )
    from offsite.artefacts.bundle import open_bundle

    bundle = open_bundle(bundle.path)
    register_bundle(home, bundle, "bench", "tiny")
    creds.save(work / "bench.creds")
    return home, bundle


def client_main(address: str, creds_path: str, bundle_id: str, out: str) -> None:
    """Child process: fetch the bundle and report timing and memory on stdout."""
    from offsite.exchange.credentials import load_credentials
    from offsite.transport.client import connect

    with connect(address, load_credentials(creds_path)) as client:
        client.health()
        _reset_peak("self")
        before = _status_kib("self", "VmRSS")
        t = time.perf_counter()
        if os.environ.get("BENCH_PROFILE"):
            import cProfile
            import pstats

            with cProfile.Profile() as prof:
                client.fetch_bundle(bundle_id, Path(out))
            pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(12)
        else:
            client.fetch_bundle(bundle_id, Path(out))
        seconds = time.perf_counter() - t
    print(
        json.dumps(
            {"seconds": seconds, "rss_before_kib": before, "peak_kib": _status_kib("self", "VmHWM")}
        )
    )


def run(size: int) -> dict:
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        work = Path(tmp)
        home, bundle = _make_bundle(work, size)
        server = subprocess.Popen([sys.executable, "-m", "owner.cli", "serve", "--home", str(home.root), "--listen", "127.0.0.1:0"],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        try:
            port = json.loads(server.stdout.readline())["listening"].rsplit(":", 1)[1]
            _reset_peak(server.pid)
            server_before = _status_kib(server.pid, "VmRSS")
            out = subprocess.run([sys.executable, "-m", "scripts.bench_transport", "--client", f"localhost:{port}",
                                  str(work / "bench.creds"), bundle.bundle_id, str(work / "fetched")],
                                 cwd=ROOT, capture_output=True, text=True, check=True)  # fmt: skip
            if os.environ.get("BENCH_PROFILE"):
                print(out.stderr[-4000:], file=sys.stderr)
            client = json.loads(out.stdout.strip().splitlines()[-1])
            server_peak = _status_kib(server.pid, "VmHWM")
        finally:
            server.terminate()
            server.wait()
        total = sum(f.stat().st_size for f in (work / "fetched").iterdir())
        t = time.perf_counter()
        shutil.copyfile(bundle.path / "payload.bin", work / "copy.bin")
        os.sync()
        copy_s = time.perf_counter() - t
    mb = total / 1e6
    return {
        "bundle_mib": round(total / 2**20, 1),
        "grpc_mtls_mb_s": round(mb / client["seconds"], 1),
        "file_copy_mb_s": round(size / 1e6 / copy_s, 1),
        "client_memory_growth_mib": round(
            (client["peak_kib"] - client["rss_before_kib"]) / 1024, 1
        ),
        "server_memory_growth_mib": round((server_peak - server_before) / 1024, 1),
        "client_peak_rss_mib": round(client["peak_kib"] / 1024, 1),
        "server_peak_rss_mib": round(server_peak / 1024, 1),
        "note": "MB/s in 10^6 bytes; the gRPC figure includes sha256 checks and the signature check on arrival",
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(*sys.argv[2:6])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 512])
    for size in parser.parse_args().sizes_mib:
        print(json.dumps(run(size << 20)), flush=True)


if __name__ == "__main__":
    main()
