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
    ceilings, zero_shots = [], []
    original, score = Scoreboard.full_finetune, Scoreboard.score

    def counted(self, *args, **kwargs):
        if "full_finetuned" not in self.known:
            ceilings.append(1)  # a real training run, not the measured ceiling passed on
        return original(self, *args, **kwargs)

    def scored(self, setting, model):
        if setting == "full_zero_shot" and setting not in self.known:
            zero_shots.append(1)
        return score(self, setting, model)

    monkeypatch.setattr(Scoreboard, "full_finetune", counted)
    monkeypatch.setattr(Scoreboard, "score", scored)
    privacy_utility.main()
    assert len(ceilings) == 1, "the ceiling is measured once for the whole sweep"
    assert len(zero_shots) == 1, "and so is the full model's zero-shot score"
    rows = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [(r["kept"], r["recipe"]) for r in rows] == [
        (k, name) for k in (1, 2) for name in ("no distillation", "layer-wise", "distilled")
    ]
    assert all(r["full_finetuned"] == rows[0]["full_finetuned"] for r in rows), (
        "the ceiling is measured once"
    )
    assert (tmp_path / "r" / "report.md").read_text().count("\n") == 2 + len(rows)
    assert (tmp_path / "r" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_transfer_study_writes_rows_table_and_frontier(tmp_path, monkeypatch, capsys):
    from scripts import transfer_study

    save_tiny("llama", tmp_path / "model")
    (tmp_path / "lw.yaml").write_text(
        "adapter_bottom: 1\nadapter_top: 3\nrecipe: {layerwise: {steps: 3}}\n"
    )
    argv = ["transfer_study", "--model", str(tmp_path / "model"), "--recipes", "drop", str(tmp_path / "lw.yaml"),
            "--learning-rate", "1e-3", "--steps", "2", "--seed", "3", "--out", str(tmp_path / "t")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    transfer_study.main()
    rows = [json.loads(line) for line in (tmp_path / "t" / "rows.jsonl").read_text().splitlines()]
    assert [(r["recipe"], r["seed"]) for r in rows] == [
        ("drop", 3),
        ("lw", 3),
    ]
    assert rows[1]["adapter"] == [0, 5, 6, 7] and "layerwise" in rows[1]["record"]
    assert all(
        -1 <= r["transfer"]["mean"] <= 1 and r["full_finetuned"] == rows[0]["full_finetuned"]
        for r in rows
    )
    assert (tmp_path / "t" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same run again measures nothing twice: it resumes, a second seed is the only new row
    monkeypatch.setattr(
        sys,
        "argv",
        argv[:-4] + ["--seeds", "3", "4", "--recipes", "drop", "--out", str(tmp_path / "t")],
    )
    transfer_study.main()
    again = [json.loads(line) for line in (tmp_path / "t" / "rows.jsonl").read_text().splitlines()]
    assert again[:2] == rows and [(r["recipe"], r["seed"]) for r in again[2:]] == [("drop", 4)]
    # another adapter learning rate is another arm: measured, not skipped; a finished recipe builds nothing
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", argv[:-4] + ["--seeds", "3", "4", "--recipes", "drop", str(tmp_path / "lw.yaml"),
                                                  "--learning-rate",
                                                  "3e-4", "--out", str(tmp_path / "t")])  # fmt: skip
    transfer_study.main()
    again = [json.loads(line) for line in (tmp_path / "t" / "rows.jsonl").read_text().splitlines()]
    assert [(r["recipe"], r["seed"], r["learning_rate"]) for r in again[3:]] == [
        ("drop", 3, 3e-4),
        ("drop", 4, 3e-4),
        ("lw", 3, 3e-4),
        ("lw", 4, 3e-4),
    ]
    # what another arm cannot change is measured once: the full model's score per seed, the emulator's
    # per recipe and seed (the same build), and passed on to every later row
    measured = lambda setting: [(r["recipe"], r["seed"]) for r in again if "reused" not in r["details"][setting]]  # noqa: E731  # fmt: skip
    assert measured("full_zero_shot") == [("drop", 3), ("drop", 4)]
    assert measured("emulator_zero_shot") == [("drop", 3), ("lw", 3), ("drop", 4), ("lw", 4)]
    assert len({r["emulator_zero_shot"] for r in again if r["recipe"] == "drop"}) == 1
    compared = (tmp_path / "t" / "compare.md").read_text()
    assert "| lw lr=3e-4 | layerwise lr=1e-3 |" not in compared, "no pair without the reference arm"
    monkeypatch.setattr(sys, "argv", sys.argv + ["--reference", "drop lr=1e-3", "lw lr=1e-3"])
    capsys.readouterr()
    transfer_study.main()
    printed = capsys.readouterr().out
    assert "[drop] every task and seed" in printed and "[lw] every task and seed" in printed
    assert "built in" not in printed, "nothing left to measure: no emulator built"
    compared = (tmp_path / "t" / "compare.md").read_text()
    assert "| drop lr=3e-4 | drop lr=1e-3 | 3,4 |" in compared
    assert "| drop lr=3e-4 | lw lr=1e-3 | 3 |" in compared, "and with the second reference"
    # earlier runs' rows, tabled and plotted together with nothing built
    rows_file = str(tmp_path / "t" / "rows.jsonl")
    argv = ["transfer_study", "--from-rows", rows_file, rows_file, "--out", str(tmp_path / "again")]
    monkeypatch.setattr(sys, "argv", argv)
    transfer_study.main()
    assert (tmp_path / "again" / "table.md").read_text().count("\n") == 2 + 2 * len(again)
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
    # a recipe that is neither built in nor a file, and a file with a mistake: exit 2 before any model
    for recipe, message in (
        ("nope", "no such built-in recipe"),
        (str(tmp_path / "bad.yaml"), "`recipe.prune`"),
    ):
        (tmp_path / "bad.yaml").write_text("recipe: {prune: 2}\n")
        monkeypatch.setattr(
            sys, "argv", ["transfer_study", "--recipes", recipe, "--out", str(tmp_path / "bad")]
        )
        with pytest.raises(SystemExit) as exit_:
            transfer_study.main()
        assert exit_.value.code == 2 and message in capsys.readouterr().err


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


def test_intervals_and_the_seed_summary():
    """Means over seeds with Student's t 95% intervals; a floor is kept only by the lower end."""
    from scripts import study_report
    from scripts.intervals import interval, kept, t95

    iv = interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(2) = 4.303
    assert iv["mean"] == 2.0 and abs(iv["high"] - 2.0 - 4.303 / 3**0.5) < 1e-9 and t95(40) == 1.96
    assert kept(interval([5.0]), 1.0) is None and kept(iv, -0.5) is True and kept(iv, 0.0) is False
    base = {"task": "sst2", "recipe": "layerwise", "metric": "accuracy", "steps": 200, "block_size": 256,
            "full_zero_shot": 0.5, "full_finetuned": 0.9, "emulator_zero_shot": 0.5, "learning_rate": 1e-3}  # fmt: skip
    rows = [{**base, "seed": s, "plug_in": p, "emulator_finetuned": e, "gap_closed": (p - 0.5) / 0.4,
             "privacy_margin": p - e} for s, p, e in ((0, 0.80, 0.70), (1, 0.82, 0.80), (2, 0.78, 0.77))]  # fmt: skip
    (s,) = study_report.summarize(rows)
    assert (
        s["seeds"] == [0, 1, 2] and s["budget"] == "200x4x256" and s["arm"] == "layerwise lr=1e-3"
    )
    assert (
        abs(s["privacy_margin"]["mean"] - 0.0433) < 1e-3 and s["margin_kept"] is False
    )  # mean above 3 points, interval not
    assert "| sst2 | layerwise lr=1e-3 | 200x4x256 | 0,1,2 |" in study_report.summary_table([s])


def test_arms_are_compared_seed_by_seed():
    """Another learning rate is another arm; its paired difference from the reference has a tight
    interval where the two arms' own intervals overlap (the seeds move both alike)."""
    from scripts import study_report

    base = {"task": "sst2", "recipe": "layerwise", "metric": "accuracy", "steps": 200, "block_size": 256,
            "full_zero_shot": 0.5, "full_finetuned": 0.9, "emulator_zero_shot": 0.5, "emulator_finetuned": 0.7}  # fmt: skip
    rows = []
    for lr, lift in ((1e-3, 0.0), (3e-4, 0.04)):
        for seed, p in ((0, 0.60), (1, 0.80), (2, 0.70), (3, 0.75)):
            plug = p + lift + 0.002 * seed
            rows.append({**base, "learning_rate": lr, "seed": seed, "plug_in": plug,
                         "gap_closed": (plug - 0.5) / 0.4, "privacy_margin": plug - 0.7})  # fmt: skip
    rows.append(
        {**rows[0], "recipe": "harmonizer", "seed": 9}
    )  # no reference row for seed 9: no pair
    arms = {s["arm"]: s for s in study_report.summarize(rows)}
    assert set(arms) == {"layerwise lr=1e-3", "layerwise lr=3e-4", "harmonizer lr=1e-3"}
    ref, other = arms["layerwise lr=1e-3"]["plug_in"], arms["layerwise lr=3e-4"]["plug_in"]
    assert other["low"] < ref["high"], "the two arms' own intervals overlap"
    (pair,) = study_report.compare(rows, ["layerwise lr=1e-3"])
    assert pair["arm"] == "layerwise lr=3e-4" and pair["seeds"] == [0, 1, 2, 3]
    assert abs(pair["plug_in"]["mean"] - 0.04) < 1e-9 and pair["plug_in"]["low"] > 0.03
    assert abs(pair["gap_closed"]["mean"] - 0.1) < 1e-9
    text = study_report.compare_table([pair])
    row = "| sst2 | 200x4x256 | layerwise lr=3e-4 | layerwise lr=1e-3 | 0,1,2,3 | +4.0 pts ["
    assert row in text and "| +10.0 pts [" in text, "signed, the gap closed in points of the gap"


def test_every_built_in_study_recipe_reads():
    """The study's recipe files are settings files: each one parses into its spec."""
    from scripts import transfer_study

    names = sorted(p.stem for p in transfer_study.RECIPES.glob("*.yaml"))
    recipes = transfer_study.load_recipes(names)
    assert {"drop", "layerwise", "harmonizer", "layerwise-1mb"} <= set(recipes)
    assert recipes["layerwise-1mb"].recipe.layerwise.steps == 300
    assert recipes["harmonizer"].recipe.layerwise is None
