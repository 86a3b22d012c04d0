"""The committed gRPC stubs are exactly what scripts/gen_protos.py makes from protos/."""

from pathlib import Path

import pytest

from scripts.gen_protos import generate

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_are_not_stale(tmp_path):
    pytest.importorskip("grpc_tools", reason="pip install grpcio-tools (the dev extra)")
    generate(tmp_path)
    for name in ("offsite_pb2.py", "offsite_pb2.pyi", "offsite_pb2_grpc.py"):
        fresh = (tmp_path / "offsite" / "transport" / "v1" / name).read_text()
        committed = (ROOT / "offsite" / "transport" / "v1" / name).read_text()
        assert fresh == committed, (
            f"offsite/transport/v1/{name} is stale: run `python -m scripts.gen_protos`"
        )
