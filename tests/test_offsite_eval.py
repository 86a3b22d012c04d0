import math

import pytest
import torch
from tiny import DEPTH, tiny_model

from offsite.emulator.build import build_emulator
from offsite.emulator.plan import make_plan
from offsite.evaluation.five_settings import derived, evaluate_offsite
from offsite.evaluation.tasks import PerplexityTask
from offsite.training.config import TrainConfig


def test_derived_figures_by_hand():
    r = {
        "full_zero_shot": 40.0,
        "plug_in": 25.0,
        "full_finetuned": 20.0,
        "emulator_finetuned": 50.0,
    }
    assert derived(r) == {"gap_closed": 0.75, "privacy_margin": 2.0}
    assert "gap_closed" not in derived({**r, "full_finetuned": None})


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_five_settings_on_a_tiny_model(precision, tokenizer, corpus_file, tmp_path):
    full = tiny_model("llama")
    before = {k: v.clone() for k, v in full.state_dict().items()}
    plan = make_plan(DEPTH, emulator_layers=2)
    task = PerplexityTask.from_files(corpus_file, corpus_file, block_size=32, eval_sequences=4)
    phases = []
    r = evaluate_offsite(full, tokenizer, plan, build_emulator(full, plan), task,
                         TrainConfig(max_steps=4, batch_size=2, learning_rate=5e-3, mixed_precision=precision),
                         on_phase=phases.append)  # fmt: skip
    for key in (
        "full_zero_shot",
        "emulator_zero_shot",
        "emulator_finetuned",
        "plug_in",
        "full_finetuned",
    ):
        assert math.isfinite(r[key]) and r[key] > 1, key
    assert (
        r["emulator_finetuned"] < r["emulator_zero_shot"]
        and r["full_finetuned"] < r["full_zero_shot"]
    )
    assert len(r["curves"]["emulator_finetune"]) == 4 and len(r["curves"]["full_finetune"]) == 4
    assert math.isclose(r["privacy_margin"], r["emulator_finetuned"] / r["plug_in"])
    assert phases[0] == "full model zero-shot" and phases[-1] == "full-model fine-tuning"
    assert all(torch.equal(v, before[k]) for k, v in full.state_dict().items()), (
        "the full model is left as it was"
    )
    if precision == "no":  # what was measured is used as it is, not measured again
        known = {k: r[k] for k in ("full_zero_shot", "emulator_zero_shot", "full_finetuned")}
        phases.clear()
        again = evaluate_offsite(full, tokenizer, plan, build_emulator(full, plan), task,
                                 TrainConfig(max_steps=4, batch_size=2, learning_rate=5e-3),
                                 measured=known, on_phase=phases.append)  # fmt: skip
        assert phases == ["fine-tuning the adapter through the emulator",
                          "emulator fine-tuned (data owner alone)", "plug-in (full model + adapter)"]  # fmt: skip
        assert "full_finetune" not in again["curves"]
        assert {k: again[k] for k in known} == known
        assert again["details"]["full_zero_shot"] == {"reused": True}
        assert math.isclose(again["gap_closed"], r["gap_closed"])
        with pytest.raises(ValueError, match="depend on the run"):
            evaluate_offsite(full, tokenizer, plan, build_emulator(full, plan), task, TrainConfig(max_steps=1),
                             measured={"plug_in": 1.0})  # fmt: skip
