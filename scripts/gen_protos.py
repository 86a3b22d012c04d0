"""Generate the committed gRPC stubs from protos/: `python -m scripts.gen_protos [--out DIR]`.

The stubs land in offsite/transport/v1/ (package offsite.transport.v1). tests/test_protos.py fails when they are stale.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = "offsite/transport/v1/offsite.proto"


def generate(out: Path) -> None:
    """Run grpc_tools.protoc on protos/offsite/transport/v1/offsite.proto into `out`."""
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    code = protoc.main(["protoc", f"-I{ROOT / 'protos'}", f"--python_out={out}", f"--pyi_out={out}",
                        f"--grpc_python_out={out}", str(ROOT / "protos" / PROTO)])  # fmt: skip
    if code != 0:
        sys.exit(f"protoc failed with exit code {code}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT)
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
