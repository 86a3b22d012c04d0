"""The pieces both simulations share: phase headers, running a CLI as its own process, serving."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

PHASES = 8


class Phase:
    """Prints a numbered phase header, and its duration when it ends."""

    n, total = 0, PHASES

    def __init__(self, title: str) -> None:
        Phase.n += 1
        self.title = title

    def __enter__(self) -> Phase:
        print(f"\n[{Phase.n}/{Phase.total}] {self.title}", flush=True)
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            print(f"      done in {time.perf_counter() - self.t:.0f} s", flush=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr and a non-zero exit (2: bad input), as the CLIs do."""
    print(f"simulate: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def cli(tool: str, *argv: str) -> dict | list:
    """Run `owner ...` or `data-owner ...` as its own process; its JSON result from stdout."""
    module = {"owner": "owner.cli", "data-owner": "data_owner.cli"}[tool]
    print(f"      $ {tool} {' '.join(argv)}", flush=True)
    done = subprocess.run([sys.executable, "-m", module, *argv], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        fail(
            f"`{tool} {argv[0]}` failed (exit code {done.returncode}); its error is above",
            done.returncode,
        )
    return json.loads(done.stdout)


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    """`owner serve` on a free loopback port; returns the process and its address."""
    argv = ["owner", "serve", "--home", str(home), "--listen", "127.0.0.1:0"]
    print(f"      $ {' '.join(argv)}", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "owner.cli", *argv[1:]], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    line = proc.stdout.readline() if proc.stdout else ""
    if not line:
        proc.wait()
        fail(f"`owner serve` exited with code {proc.returncode}", 1)
    address = json.loads(line)["listening"].replace("127.0.0.1", "localhost")
    print(f"      serving on {address} (pid {proc.pid}, mutual TLS)", flush=True)
    return proc, address
