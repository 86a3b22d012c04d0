"""Harmonizer emulators: kept blocks as the full model has them, a fitted low-rank stand-in in place
of each run of dropped blocks; still a plain Hugging Face model of the same family."""

from __future__ import annotations

import pytest
import torch
from tiny import DEPTH, FAMILIES, VOCAB, tiny_model

from offsite.artefacts.bundle import open_bundle
from offsite.emulator.bundling import package_emulator
from offsite.emulator.harmonizer import (
    HarmonizerConfig,
    dropped_runs,
    fit_harmonizers,
    harmonized_plan,
    make_stand_in,
)
from offsite.emulator.plan import SplitPlan, make_plan
from offsite.emulator.recipe import EmulatorRecipe, make_emulator
from offsite.errors import OffsiteError
from offsite.models.architectures import arch_spec, get_blocks
from offsite.training.data import load_data

# 8 blocks: adapter 0, 1, 6, 7; middle 2..5, keeping 3 drops the runs [2] and [4, 5]
PLAN = SplitPlan(DEPTH, (0, 1, 6, 7), (3,), "explicit")


def test_dropped_runs_and_the_harmonized_plan():
    assert dropped_runs(PLAN) == [(2, 3), (4, 6)]
    assert harmonized_plan(PLAN).kept == (2, 3, 4)
    assert dropped_runs(make_plan(DEPTH, emulator_layers=4)) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_a_stand_in_starts_as_the_identity_and_holds_nothing_of_the_dropped_block(family):
    model = tiny_model(family)
    blocks = get_blocks(model)
    dropped = {n: p.detach().clone() for n, p in blocks[4].named_parameters()}
    below = {n: p.detach().clone() for n, p in blocks[3].named_parameters()}
    trainable = make_stand_in(blocks[4], blocks[3], model.config.model_type, rank=4)
    layout = arch_spec(model.config.model_type).mlp
    for name, p in blocks[4].named_parameters():
        silenced = any(name.startswith(m + ".") for m in (*layout.attention_out, *layout.mlp_out))
        masked = any(name.startswith(m + ".") for m in layout.mlp_in)
        if silenced:
            assert not p.any(), name
        elif masked:
            assert 0 < int((p != 0).sum()) < p.numel() or p.numel() == 0, name  # a few hidden units
        else:
            assert torch.equal(p, below[name]), (
                name
            )  # copied from the block below, not the dropped one
        if p.numel() > 16 and not torch.equal(dropped[name], below[name]):
            assert not torch.equal(p, dropped[name]), name
    assert trainable and all(m is None or m.shape[0] * m.shape[-1] > 0 for _, m in trainable)
    # the output projection is zero: the block passes its input through, whatever the input
    with torch.no_grad():
        ids = torch.randint(3, VOCAB, (2, 6))
        model.eval()
        states = []
        handle = blocks[4].register_forward_hook(
            lambda m, a, k, out: states.append((a, k, out)), with_kwargs=True
        )
        model(ids)
        handle.remove()
    (args, kwargs, out) = states[0]
    x = args[0] if args else kwargs["hidden_states"]
    y = out[0] if isinstance(out, tuple) else out
    assert torch.allclose(x, y, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "gpt_neox", "gemma2"])
def test_fitting_lowers_each_stand_ins_error_and_keeps_the_kept_blocks(
    family, tokenizer, corpus_file
):
    full = tiny_model(family)
    data = load_data(corpus_file, tokenizer, 16)
    cfg = HarmonizerConfig(rank=4, steps=30, learning_rate=1e-2, max_sequences=8)
    emulator, plan, record = fit_harmonizers(full, PLAN, data, cfg)
    assert plan.kept == (2, 3, 4) and record["stand_ins"] == [2, 4]
    assert record["stands_for"] == {"2": [2], "4": [4, 5]}
    fitted = [r for r in record["spans"] if r.get("stand_in")]
    assert len(fitted) == 2 and all(r["loss_last"] < r["loss_first"] for r in fitted), fitted
    full_blocks, emu_blocks = get_blocks(full), get_blocks(emulator)
    kept = plan.emulator_order.index(3)
    for (n, a), b in zip(
        full_blocks[3].named_parameters(), emu_blocks[kept].parameters(), strict=True
    ):
        assert torch.equal(a, b), n  # the kept block exactly as the full model has it
    # the hidden units past the rank stay zero after fitting
    layout = arch_spec(full.config.model_type).mlp
    module = emu_blocks[plan.emulator_order.index(4)].get_submodule(layout.mlp_out[0])
    units = 1 - arch_spec(full.config.model_type).matmuls.get(
        type(module).__name__, 0
    )  # its input axis
    used = (module.weight != 0).any(dim=1 - units)
    assert 0 < int(used.sum()) <= 4 < used.numel()


def test_a_harmonizer_bundle_is_a_plain_model_and_records_its_stand_ins(
    tokenizer, tmp_path, corpus_file
):
    from transformers import AutoModelForCausalLM

    full = tiny_model("qwen2")
    recipe = EmulatorRecipe(selection="uniform", selection_data=corpus_file, block_size=16, layerwise=None,
                            harmonizer=HarmonizerConfig(rank=4, steps=5, max_sequences=4))  # fmt: skip
    emulator, plan, record = make_emulator(
        full, tokenizer, make_plan(DEPTH, emulator_layers=2), recipe
    )
    package_emulator(full, tokenizer, plan, tmp_path / "b", base_name="q", emulator=emulator,
                     extra={"emulator_recipe": record})  # fmt: skip
    manifest = open_bundle(tmp_path / "b").manifest
    assert manifest["emulator_recipe"]["harmonizer"]["stand_ins"] == sorted(set(plan.kept) - {2, 5})
    assert manifest["emulator"]["kept"] == list(plan.kept)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "b")  # plain transformers
    x = torch.randint(3, VOCAB, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, emulator(x).logits)


def test_harmonizer_settings_are_checked():
    with pytest.raises(OffsiteError, match="`rank` must be a whole number >= 1"):
        HarmonizerConfig(rank=0)
    with pytest.raises(OffsiteError, match="set `layerwise` to null"):
        EmulatorRecipe(harmonizer=HarmonizerConfig())
    with pytest.raises(OffsiteError, match="more than the MLP's"):
        model = tiny_model("llama")
        make_stand_in(get_blocks(model)[4], get_blocks(model)[3], "llama", rank=10_000)


def test_a_bf16_model_is_fitted_through_float32_and_stays_bf16(tokenizer, corpus_file):
    full = tiny_model("llama").to(torch.bfloat16)
    data = load_data(corpus_file, tokenizer, 16)
    cfg = HarmonizerConfig(rank=4, steps=20, learning_rate=1e-2, max_sequences=8)
    emulator, plan, record = fit_harmonizers(full, PLAN, data, cfg)
    assert {p.dtype for p in emulator.parameters()} == {torch.bfloat16}
    fitted = [r for r in record["spans"] if r.get("stand_in")]
    assert all(r["loss_last"] < r["loss_first"] for r in fitted), fitted
    out = get_blocks(emulator)[plan.emulator_order.index(4)].mlp.down_proj.weight
    assert 0 < int((out != 0).any(dim=0).sum()) <= 4
