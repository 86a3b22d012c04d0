"""Layer-wise distillation and the transfer score, over tiny models of several families."""

from __future__ import annotations

import pytest
import torch
from tiny import CORPUS, DEPTH, VOCAB, tiny_model

from offsite.artefacts.bundle import open_bundle
from offsite.emulator.build import build_emulator
from offsite.emulator.layerwise import LayerwiseConfig, distill_layerwise, spans
from offsite.emulator.package import package_emulator
from offsite.emulator.plan import make_plan
from offsite.emulator.recipe import EmulatorRecipe, make_emulator
from offsite.emulator.transfer import transfer_score
from offsite.errors import OffsiteError
from offsite.models.architectures import get_blocks
from offsite.training.data import text_data

FAMILIES = [
    "llama",
    "gpt2",
    "gemma2",
    "opt",
]  # rotary, learned positions, sliding windows, OPT's layout


@pytest.fixture(scope="module")
def sample(tokenizer):
    return text_data(CORPUS, tokenizer, 16, "corpus")


def test_spans_cover_the_middle_once():
    plan = make_plan(12, emulator_layers=3)
    table = spans(plan)
    assert [k for k, _, _ in table] == list(plan.kept)
    covered = [i for _, s, e in table for i in range(s, e)]
    assert covered == list(plan.middle)
    assert all(s <= k < e for k, s, e in table)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("inputs, noise, gw", [("emulator", 0.0, 0.0), ("teacher", 0.0, 0.0), ("emulator", 0.05, 0.0),
                                               ("emulator", 0.0, 1.0)])  # fmt: skip
def test_layerwise_lowers_each_span_loss_and_keeps_the_full_model(
    family, inputs, noise, gw, sample
):
    full = tiny_model(family)
    before = {k: v.clone() for k, v in full.state_dict().items()}
    plan = make_plan(DEPTH, emulator_layers=2)
    emulator, record = distill_layerwise(
        full, plan, sample, LayerwiseConfig(steps=40, learning_rate=3e-3, inputs=inputs)
    )
    trained = [s for s in record["spans"] if s["span"][1] > s["span"][0]]  # spans that drop blocks
    assert trained and all(s["loss_last"] < s["loss_first"] for s in trained)
    assert all(torch.equal(v, before[k]) for k, v in full.state_dict().items()), (
        "the full model is untouched"
    )
    assert not any(p.requires_grad for p in emulator.parameters())
    assert len(get_blocks(emulator)) == len(plan.emulator_order)
    x = torch.randint(3, VOCAB, (1, 8))
    with torch.no_grad():
        assert emulator.generate(x, max_new_tokens=3, do_sample=False).shape == (1, 11)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_a_bfloat16_model_is_fitted_through_float32_and_stays_bfloat16(family, sample):
    """Fitting a 16-bit model's blocks in their own dtype loses most of each update; through a
    float32 copy it fits as well as the float32 model does (same losses within rounding)."""
    plan, cfg = make_plan(DEPTH, emulator_layers=2), LayerwiseConfig(steps=40)
    reports = {}
    for dtype in (torch.float32, torch.bfloat16):
        emulator, record = distill_layerwise(tiny_model(family).to(dtype), plan, sample, cfg)
        assert all(p.dtype == dtype for p in emulator.parameters())
        reports[dtype] = [s["loss_last"] for s in record["spans"]]
    for wide, narrow in zip(reports[torch.float32], reports[torch.bfloat16], strict=True):
        assert narrow == pytest.approx(wide, rel=0.015)


def test_layerwise_brings_the_emulator_closer_to_the_full_model(sample):
    full = tiny_model("llama")
    plan = make_plan(DEPTH, emulator_layers=2)
    x = torch.tensor([e.input_ids for e in sample.examples[:8]])
    emulator, _ = distill_layerwise(
        full, plan, sample, LayerwiseConfig(steps=60, learning_rate=3e-3)
    )
    with torch.no_grad():
        target = full(x).logits
        drop_err = (build_emulator(full, plan)(x).logits - target).pow(2).mean()
        lw_err = (emulator(x).logits - target).pow(2).mean()
    assert lw_err < drop_err


@pytest.mark.parametrize("family", FAMILIES)
def test_transfer_score_is_one_when_nothing_is_dropped(family, sample):
    full = tiny_model(family)
    whole = make_plan(DEPTH, emulator_layers=DEPTH - 4)
    score = transfer_score(full, build_emulator(full, whole), whole, sample)
    assert score["mean"] == pytest.approx(1.0, abs=1e-3)
    half = make_plan(DEPTH, emulator_layers=2)
    assert transfer_score(full, build_emulator(full, half), half, sample)["mean"] < 0.999


def test_recipe_records_layerwise_and_transfer_score_in_the_manifest(
    tokenizer, tmp_path, corpus_file
):
    full = tiny_model("qwen2")
    recipe = EmulatorRecipe(
        selection_data=corpus_file, block_size=16, layerwise=LayerwiseConfig(steps=5)
    )
    emulator, plan, record = make_emulator(
        full, tokenizer, make_plan(DEPTH, emulator_layers=2), recipe
    )
    package_emulator(full, tokenizer, plan, tmp_path / "b", base_name="q", emulator=emulator,
                     extra={"emulator_recipe": record})  # fmt: skip
    manifest = open_bundle(tmp_path / "b").manifest
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "b")  # plain transformers
    assert len(get_blocks(loaded)) == len(plan.emulator_order)  # no dropped block's weights
    x = torch.randint(3, VOCAB, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, emulator(x).logits)
        assert loaded.generate(x, max_new_tokens=2, do_sample=False).shape == (1, 10)
    assert [b["source"] for b in manifest["blocks"] if b["role"] == "adapter"] == [
        0,
        1,
        6,
        7,
    ]  # placement
    lw = manifest["emulator_recipe"]["layerwise"]
    assert lw["steps_per_block"] == 5
    assert lw["kept"] == (
        "fitted" if lw["transfer_score_fitted"] >= lw["transfer_score_dropped"] else "dropped"
    )
    assert set(manifest["emulator_recipe"]["transfer_score"]) == {"0", "1", "6", "7", "mean"}
    assert manifest["blocks"][0]["role"] == "adapter"


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "at least 1"), ({"learning_rate": float("inf")}, "positive number"),
    ({"inputs": "x"}, "unknown"), ({"noise": -1.0}, ">= 0"),
])  # fmt: skip
def test_bad_layerwise_options(kwargs, message):
    with pytest.raises(OffsiteError, match=message):
        LayerwiseConfig(**kwargs)


@pytest.mark.parametrize("gate", [True, False])
def test_a_fitted_emulator_that_scores_worse_than_dropping_is_not_kept(
    gate, tokenizer, corpus_file, monkeypatch
):
    """The gate ships the plain drop where the fit scores worse; `gate: false` ships the fit."""
    from offsite.emulator import recipe as recipe_module

    def broken(full, plan, data, cfg):
        emulator = build_emulator(full, plan)
        with torch.no_grad():
            for p in get_blocks(emulator)[2].parameters():
                p.mul_(-50.0)  # a "fit" that wrecks the gradients the adapter receives
        return emulator, {"method": "layerwise"}

    monkeypatch.setattr(recipe_module, "distill_layerwise", broken)
    full = tiny_model("llama")
    recipe = EmulatorRecipe(
        selection_data=corpus_file, block_size=16, layerwise=LayerwiseConfig(steps=1, gate=gate)
    )
    emulator, plan, record = make_emulator(
        full, tokenizer, make_plan(DEPTH, emulator_layers=2), recipe
    )
    assert record["layerwise"]["kept"] == ("dropped" if gate else "fitted")
    x = torch.randint(3, VOCAB, (1, 8))
    with torch.no_grad():
        same = torch.equal(emulator(x).logits, build_emulator(full, plan)(x).logits)
    assert same == gate


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fit_carries_the_full_models_own_state_up_span_by_span(family, sample):
    """The capture keeps one state per batch (what enters the middle) and each block's call; the
    full model's state at every span's end is then recomputed from it, equal to its own forward's.
    (Before, every span's entering and leaving state was cached: 26 copies of the sample's states
    on SmolLM2, 15 GB at 1,000 sequences.)"""
    from offsite.emulator.layerwise import capture_spans, through
    from offsite.training.data import collate

    full = tiny_model(family)
    plan = make_plan(DEPTH, emulator_layers=2)
    table = spans(plan)
    cache = capture_spans(full, sample, 4, table, grads=False)
    assert all(set(b) == {"in", "call"} and torch.is_tensor(b["in"]) for b in cache)
    # a call holds no block's input: the state the model passed (positionally or by name) is left out
    held = [v for b in cache for c in b["call"].values() for v in (*c.args, *c.kwargs.values())]
    assert all(not (torch.is_tensor(v) and v.shape == cache[0]["in"].shape) for v in held)
    with torch.no_grad():
        hidden = [full(**collate(sample.examples[i : i + 4], 0), output_hidden_states=True).hidden_states
                  for i in range(0, len(sample), 4)]  # fmt: skip
    teacher = [b["in"] for b in cache]
    blocks = get_blocks(full)
    for _, s, e in table:
        assert all(torch.allclose(t, h[s], atol=1e-5) for t, h in zip(teacher, hidden, strict=True))
        teacher = through(
            [(blocks[i], [b["call"][i] for b in cache]) for i in range(s, e)], teacher
        )


def test_no_fit_uses_the_sequences_the_transfer_score_is_measured_on(tokenizer, tmp_path):
    """A sample larger than the fit's `max_sequences` asks for: the last 8 sequences, on which the
    transfer score decides between fitted and dropped, stay out of the fit."""
    from offsite.emulator.harmonizer import HarmonizerConfig

    path = tmp_path / "sample.txt"
    path.write_text(CORPUS)
    for kind in ({"layerwise": LayerwiseConfig(steps=1, max_sequences=10_000)},
                 {"layerwise": None, "harmonizer": HarmonizerConfig(rank=2, steps=1, max_sequences=10_000)}):  # fmt: skip
        recipe = EmulatorRecipe(selection_data=path, block_size=16, **kind)
        n = len(text_data(CORPUS, tokenizer, 16, "corpus"))
        assert n > 16
        _, _, record = make_emulator(
            tiny_model("llama"), tokenizer, make_plan(DEPTH, emulator_layers=2), recipe
        )
        fit = record.get("layerwise") or record["harmonizer"]
        assert fit["sequences"] == n - 8
