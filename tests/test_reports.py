"""The privacy-utility sweep writes its table, JSON and plot (tiny model, a few steps)."""

import json
import sys

import pytest
from tiny import save_tiny

from offsite.evaluation.five_settings import Scoreboard
from scripts import privacy_utility


def test_privacy_utility_sweep_writes_table_json_and_plot(tmp_path, corpus_file, monkeypatch):
    save_tiny("llama", tmp_path / "model")
    argv = ["privacy_utility", "--model", str(tmp_path / "model"), "--train", str(corpus_file), "--test", str(corpus_file),
            "--kept", "1", "2", "--steps", "2", "--block-size", "16", "--eval-sequences", "4", "--out", str(tmp_path / "r"),
            "--distill-data", str(corpus_file), "--distill-steps", "2", "--layerwise-steps", "2"]  # fmt: skip
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
        (k, name) for k in (1, 2) for name in ("no distillation", "layer-wise", "distilled")
    ]
    assert all(r["full_finetuned"] == rows[0]["full_finetuned"] for r in rows), (
        "the ceiling is measured once"
    )
    assert (tmp_path / "r" / "report.md").read_text().count("\n") == 2 + len(rows)
    assert (tmp_path / "r" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_transfer_study_writes_rows_table_and_frontier(tmp_path, monkeypatch):
    from scripts import transfer_study

    save_tiny("llama", tmp_path / "model")
    argv = ["transfer_study", "--model", str(tmp_path / "model"), "--recipes", "drop", "layerwise:steps=3,bottom=1,top=3",
            "--steps", "2", "--seed", "3", "--out", str(tmp_path / "t")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    transfer_study.main()
    rows = [json.loads(line) for line in (tmp_path / "t" / "rows.jsonl").read_text().splitlines()]
    assert [(r["recipe"], r["seed"]) for r in rows] == [
        ("drop", 3),
        ("layerwise:steps=3,bottom=1,top=3", 3),
    ]
    assert rows[1]["adapter"] == [0, 5, 6, 7] and "layerwise" in rows[1]["record"]
    assert all(
        -1 <= r["transfer"]["mean"] <= 1 and r["full_finetuned"] == rows[0]["full_finetuned"]
        for r in rows
    )
    assert (tmp_path / "t" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # earlier runs' rows, tabled and plotted together with nothing built
    rows_file = str(tmp_path / "t" / "rows.jsonl")
    argv = ["transfer_study", "--from-rows", rows_file, rows_file, "--out", str(tmp_path / "again")]
    monkeypatch.setattr(sys, "argv", argv)
    transfer_study.main()
    assert (tmp_path / "again" / "table.md").read_text().count("\n") == 2 + 2 * len(rows)
    assert (tmp_path / "again" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a missing rows file: one line, exit 2, nothing written
    argv = [
        "transfer_study",
        "--from-rows",
        str(tmp_path / "none.jsonl"),
        "--out",
        str(tmp_path / "bad"),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        transfer_study.main()
    assert exit_.value.code == 2 and not (tmp_path / "bad").exists()


def test_realign_study_compares_a_kept_and_a_realigned_emulator(tmp_path, monkeypatch, capsys):
    from scripts import realign_study

    save_tiny("llama", tmp_path / "model")
    argv = ["realign_study", "--model", str(tmp_path / "model"), "--steps", "4", "--rounds", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    realign_study.main()
    rows = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    by = {(r.get("round"), r.get("arm")): r for r in rows}
    first = [by[1, "kept"], by[1, "realigned"]]
    assert first[0]["plug_in"] == first[1]["plug_in"], "round 1: the same emulator and batches"
    assert "realign_seconds" in first[1] and (2, "realigned") in by and (2, "kept") in by
    assert set(rows[-1]) == {"full_zero_shot", "full_finetuned"}
