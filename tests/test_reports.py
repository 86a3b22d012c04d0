"""The privacy-utility sweep writes its table, JSON and plot (tiny model, a few steps)."""

import json
import sys

from tiny import save_tiny

from offsite.evaluation.five_settings import Scoreboard
from scripts import privacy_utility


def test_privacy_utility_sweep_writes_table_json_and_plot(tmp_path, corpus_file, monkeypatch):
    save_tiny("llama", tmp_path / "model")
    argv = ["privacy_utility", "--model", str(tmp_path / "model"), "--train", str(corpus_file), "--test", str(corpus_file),
            "--kept", "1", "2", "--steps", "2", "--block-size", "16", "--eval-sequences", "4", "--out", str(tmp_path / "r"),
            "--distill-data", str(corpus_file), "--distill-steps", "2"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    ceilings = []
    original = Scoreboard.full_finetune
    monkeypatch.setattr(
        Scoreboard,
        "full_finetune",
        lambda self, *a, **k: ceilings.append(1) or original(self, *a, **k),
    )
    privacy_utility.main()
    assert len(ceilings) == 1, "the ceiling is measured once for the whole sweep"
    rows = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [(r["kept"], r["recipe"]) for r in rows] == [
        (1, "no distillation"),
        (1, "distilled"),
        (2, "no distillation"),
        (2, "distilled"),
    ]
    assert all(r["full_finetuned"] == rows[0]["full_finetuned"] for r in rows), (
        "the ceiling is measured once"
    )
    assert (tmp_path / "r" / "report.md").read_text().count("\n") == 2 + len(rows)
    assert (tmp_path / "r" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
