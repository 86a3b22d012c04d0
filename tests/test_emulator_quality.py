"""Selection strategies, distillation and compression on tiny models."""

from __future__ import annotations

import pytest
import torch
from tiny import DEPTH, VOCAB, tiny_model
from transformers import AutoModelForCausalLM

from offsite.artefacts.bundle import open_bundle
from offsite.emulator.compress import prune_magnitude, quantize_weights
from offsite.emulator.distill import student_and_loss
from offsite.emulator.package import package_emulator
from offsite.emulator.plan import make_plan
from offsite.emulator.recipe import PUBLIC_SAMPLE, EmulatorRecipe, make_emulator
from offsite.emulator.selection import BlockStats, block_stats, contiguous_clusters, select_plan
from offsite.models.architectures import block_prefix, get_blocks
from offsite.training.config import TrainConfig
from offsite.training.data import load_data
from offsite.training.loop import train


def _silence(model, blocks):
    """Make blocks exact identities: zero the projections that write into the residual stream."""
    with torch.no_grad():
        for i in blocks:
            b = get_blocks(model)[i]
            b.self_attn.o_proj.weight.zero_()
            b.mlp.down_proj.weight.zero_()


@pytest.fixture
def sample(tokenizer, corpus_file):
    return load_data(corpus_file, tokenizer, 32)


def test_redundancy_drops_identity_blocks(sample):
    model = tiny_model("llama")
    _silence(model, [3, 4])  # middle is 2..5; 3 and 4 do nothing
    stats = block_stats(model, sample)
    assert stats.redundancy[3] < 1e-6 and stats.redundancy[4] < 1e-6
    assert min(stats.redundancy[2], stats.redundancy[5]) > 1e-3
    plan = select_plan(make_plan(DEPTH, emulator_layers=2), "redundancy", stats)
    assert plan.kept == (2, 5) and plan.strategy == "redundancy"


def test_similarity_clusters_are_contiguous_and_follow_the_matrix():
    middle = [2, 3, 4, 5, 6, 7]
    sim = [[0.0] * 10 for _ in range(10)]
    for group in ([2, 3, 4], [5, 6, 7]):  # two groups of mutually similar blocks
        for a in group:
            for b in group:
                sim[a][b] = 1.0
    stats = BlockStats(redundancy=[0, 0, 0.1, 0.5, 0.2, 0.3, 0.1, 0.9, 0, 0], similarity=sim)
    assert contiguous_clusters(middle, 2, stats) == [[2, 3, 4], [5, 6, 7]]
    plan = select_plan(make_plan(10, emulator_layers=2), "similarity", stats)
    assert plan.kept == (3, 7), "one representative per cluster: its least redundant block"


def test_distillation_lowers_the_student_teacher_loss(sample):
    full = tiny_model("llama")
    plan = make_plan(DEPTH, emulator_layers=2)
    student, loss = student_and_loss(full, plan, weight=30.0)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    prefix = block_prefix("llama")
    assert trainable and all(n.startswith((f"{prefix}.2.", f"{prefix}.3.")) for n in trainable), (
        "only kept middle blocks"
    )
    batch = {
        k: v
        for k, v in __import__("offsite.training.data", fromlist=["collate"])
        .collate(sample.examples[:8], 0)
        .items()
    }

    def hidden_gap():
        with torch.no_grad():
            target = loss.target(batch)
            student(**batch)
            return float(
                loss.hidden_loss(loss._student_hidden, target, batch["attention_mask"].float())
            )

    before = hidden_gap()
    frozen = {n: p.clone() for n, p in student.named_parameters() if not p.requires_grad}
    full_before = {k: v.clone() for k, v in full.state_dict().items()}
    train(
        student,
        sample,
        TrainConfig(max_steps=15, learning_rate=3e-3, batch_size=4),
        pad_id=0,
        loss_fn=loss,
    )
    assert hidden_gap() < 0.7 * before
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen), (
        "adapter etc. frozen"
    )
    assert all(torch.equal(v, full_before[k]) for k, v in full.state_dict().items()), (
        "teacher untouched"
    )


def test_pruning_and_quantization_touch_only_emulator_blocks():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_magnitude(model, [2, 3], 0.5)
    quantize_weights(model, [2, 3], 4)
    prefix = block_prefix("llama")
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith((f"{prefix}.2.", f"{prefix}.3.")) for k in changed)
    w = get_blocks(model)[2].mlp.up_proj.weight
    assert (w == 0).float().mean() >= 0.5
    assert all(len(torch.unique(row)) <= 2**4 for row in get_blocks(model)[3].mlp.up_proj.weight)


@pytest.mark.parametrize("selection", ["uniform", "redundancy", "similarity"])
def test_bundles_from_every_strategy_pass_the_core_invariants(
    selection, tokenizer, tmp_path, corpus_file
):
    full = tiny_model("qwen2")
    recipe = EmulatorRecipe(selection=selection, selection_data=corpus_file, block_size=32, prune=0.3, quantize_bits=8,
                            distill_data=corpus_file if selection == "similarity" else None,
                            distill=TrainConfig(max_steps=2, batch_size=2, eval_every=1), checkpoint_dir=tmp_path / "ck")  # fmt: skip
    emulator, plan, record = make_emulator(
        full, tokenizer, make_plan(DEPTH, emulator_layers=2), recipe
    )
    bundle = package_emulator(full, tokenizer, plan, tmp_path / "b", base_name="q", emulator=emulator,
                              extra={"emulator_recipe": record})  # fmt: skip
    manifest = open_bundle(tmp_path / "b").manifest
    assert manifest["emulator"]["strategy"] == selection and manifest["emulator"]["kept"] == list(
        plan.kept
    )
    assert manifest["emulator_recipe"]["selection"]["kept"] == list(plan.kept)
    assert ("distillation" in manifest["emulator_recipe"]) == (selection == "similarity")
    loaded = AutoModelForCausalLM.from_pretrained(bundle.path)
    x = torch.randint(3, VOCAB, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, emulator(x).logits)
    assert loaded.generate(x, max_new_tokens=3, do_sample=False).shape == (1, 11)
    prefix = block_prefix("qwen2")
    stored = {k for k in loaded.state_dict() if k.startswith(prefix)}
    assert {int(k.split(".")[2]) for k in stored} == set(range(len(plan.emulator_order)))
    if selection != "uniform":  # the statistics were measured on the sample given
        assert len(record["selection"]["redundancy"]) == DEPTH
        assert len(set(record["selection"]["redundancy"])) > 1


def test_distillation_leaves_the_full_model_usable(sample):
    from offsite.emulator.distill import distill_emulator

    full = tiny_model("llama")
    x = torch.randint(3, VOCAB, (1, 8))
    with torch.no_grad():
        before = full(x).logits
    student, summary = distill_emulator(full, make_plan(DEPTH, emulator_layers=2), sample,
                                        TrainConfig(max_steps=2, batch_size=2), pad_id=0, val_data=sample)  # fmt: skip
    with torch.no_grad():  # the teacher's stop-hook used to stay on the full model and break this
        assert torch.equal(full(x).logits, before)
        student(x)
    assert summary["best_step"] in (1, 2) and not any(p.requires_grad for p in student.parameters())


def test_default_recipe_selects_by_redundancy_on_the_builtin_sample(tokenizer):
    full = tiny_model("llama")
    _, plan, record = make_emulator(
        full, tokenizer, make_plan(DEPTH, emulator_layers=2), EmulatorRecipe()
    )
    assert (
        record["selection"]["strategy"] == "redundancy"
        and len(record["selection"]["redundancy"]) == DEPTH
    )
    assert PUBLIC_SAMPLE.is_file() and len(plan.kept) == 2
