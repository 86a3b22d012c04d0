"""The process-wide glibc setting that keeps training's peak memory down (measured in the
benchmark, not here): applied once, and never over the user's own setting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from offsite.training import allocator

CHECK = "from offsite.training.allocator import limit_heap_growth as f; print(f(), f())"


def _run(env: dict) -> str:
    return subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip


@pytest.mark.skipif(allocator._glibc() is None, reason="the C library here is not glibc")
def test_set_once_on_glibc_but_never_over_the_users_setting():
    base = {k: v for k, v in os.environ.items() if k != allocator._ENV}
    assert _run(base) == "True True"
    assert _run({**base, allocator._ENV: "65536"}) == "False False"


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    monkeypatch.delenv(allocator._ENV, raising=False)
    assert allocator.limit_heap_growth() is False
