import pytest
import torch
from safetensors.torch import load_file
from tiny import DEPTH, tiny_model

from offsite.artefacts.adapter import WEIGHTS_NAME
from offsite.emulator.package import package_emulator
from offsite.emulator.plan import make_plan
from offsite.errors import OffsiteError
from offsite.training.checkpoint import MARKER, claim_checkpoint_dir
from offsite.training.config import TrainConfig
from offsite.training.finetune import FinetuneJob, finetune_bundle
from offsite.training.loop import epoch_batches

CFG = TrainConfig(
    max_steps=6, learning_rate=5e-3, batch_size=2, grad_accum=2, save_every=2, warmup_steps=1
)


class Crash(Exception):
    pass


def _crash_at(step):
    def on_step(info):
        if info.step == step:
            raise Crash

    return on_step


@pytest.fixture
def bundle(tmp_path, tokenizer):
    return package_emulator(
        tiny_model("qwen2"),
        tokenizer,
        make_plan(DEPTH, emulator_layers=2),
        tmp_path / "b",
        base_name="q",
    )


def test_resume_after_a_crash_continues_from_the_checkpoint(bundle, tmp_path, corpus_file):
    reference = finetune_bundle(
        bundle, FinetuneJob(corpus_file, tmp_path / "ref", block_size=16), CFG
    )

    job = FinetuneJob(corpus_file, tmp_path / "a", block_size=16)
    with pytest.raises(Crash):
        finetune_bundle(bundle, job, CFG, on_step=_crash_at(5))
    assert not (tmp_path / "a").exists(), "no partial adapter after a crash"
    state = (tmp_path / "a.ckpt" / "latest" / "state.json").read_text()
    assert '"step": 4' in state

    with pytest.raises(OffsiteError, match="a checkpoint exists; pass `resume`"):
        finetune_bundle(bundle, job, CFG)
    steps_seen = []
    resumed = finetune_bundle(
        bundle, FinetuneJob(corpus_file, tmp_path / "a", block_size=16, resume=True), CFG,
        on_step=lambda info: steps_seen.append(info.step),
    )  # fmt: skip
    assert steps_seen == [5, 6], "resumed at the step after the checkpoint"
    a, b = (
        load_file(str(resumed.path / WEIGHTS_NAME)),
        load_file(str(reference.path / WEIGHTS_NAME)),
    )
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), (
        "same result as an uninterrupted run"
    )
    assert resumed.manifest["training"]["steps"] == 6


def test_resume_refuses_a_checkpoint_from_other_settings(bundle, tmp_path, corpus_file):
    job = FinetuneJob(corpus_file, tmp_path / "a", block_size=16)
    with pytest.raises(Crash):
        finetune_bundle(bundle, job, CFG, on_step=_crash_at(3))
    other = TrainConfig(max_steps=6, learning_rate=1e-3, batch_size=2, grad_accum=2, save_every=2)
    with pytest.raises(
        OffsiteError, match="checkpoint was made with other data, bundle or settings"
    ):
        finetune_bundle(
            bundle, FinetuneJob(corpus_file, tmp_path / "a", block_size=16, resume=True), other
        )


def test_epoch_batches_partition_data_across_ranks():
    cfg = TrainConfig(batch_size=2, grad_accum=1, seed=1)
    ranks = [epoch_batches(10, cfg, 0, r, 2) for r in range(2)]
    flat = [i for r in ranks for b in r for i in b]
    assert sorted(flat) == list(range(10)) and len(ranks[0]) == len(ranks[1])
    assert epoch_batches(10, cfg, 1, 0, 2) != ranks[0], "a new shuffle each epoch"


def test_too_little_data_for_one_step_is_a_clear_error(bundle, tmp_path, corpus_file):
    cfg = TrainConfig(max_steps=1, batch_size=10_000, grad_accum=2)
    with pytest.raises(OffsiteError, match="fewer than one step needs"):
        finetune_bundle(bundle, FinetuneJob(corpus_file, tmp_path / "a", block_size=16), cfg)


@pytest.mark.parametrize("kwargs, message", [({"batch_size": 0}, "`batch_size`"), ({"lr_scheduler": "x"}, "`lr_scheduler`"),
                                             ({"mixed_precision": "fp8"}, "`mixed_precision`"), ({"max_steps": 0}, "`max_steps`")])  # fmt: skip
def test_invalid_training_config(kwargs, message):
    with pytest.raises(OffsiteError, match=message):
        TrainConfig(**kwargs)


def test_a_schedule_part_continues_the_whole_schedule_and_its_data(corpus_file, tokenizer):
    """Federated round i of n: its learning rates and its batches are steps i*k .. i*k+k-1 of one
    run over n*k steps (not the first k batches again)."""
    from offsite.training.data import TokenData, load_data
    from offsite.training.loop import train
    from offsite.training.loss import lm_loss

    full = load_data(corpus_file, tokenizer, 16)
    data = TokenData(full.examples[:10], full.source, full.sha256, full.mode)  # 5 steps an epoch

    def run(steps, part):
        lrs, batches = [], []

        def loss(model, batch):
            batches.append(batch["input_ids"].tolist())
            return lm_loss(model, batch)

        cfg = TrainConfig(max_steps=steps, batch_size=2, learning_rate=1e-3, warmup_steps=2, save_every=0,
                          schedule_part=part)  # fmt: skip
        train(tiny_model("llama"), data, cfg, pad_id=0, loss_fn=loss,
              on_step=lambda i: lrs.append(i.learning_rate))  # fmt: skip
        return lrs, batches

    whole = run(9, (0, 1))
    parts = [run(3, (i, 3)) for i in range(3)]
    for got in (0, 1):  # learning rates, batches
        assert [p[got] for p in parts] == [whole[got][0:3], whole[got][3:6], whole[got][6:9]]
    assert whole[0][-1] == 0 and max(whole[0]) == 1e-3
    assert len(data) < 18, "the whole run wraps into a second epoch, and so do the parts"


def test_a_federated_bundle_sets_the_round_schedule():
    from types import SimpleNamespace

    from offsite.training.finetune import round_schedule

    federated = SimpleNamespace(manifest={"federation": {"name": "f", "round": 2, "rounds": 5}})
    assert round_schedule(TrainConfig(), federated).schedule_part == (2, 5)
    assert round_schedule(TrainConfig(), SimpleNamespace(manifest={})) == TrainConfig()
    with pytest.raises(OffsiteError, match="schedule part 5 of 5"):
        TrainConfig(schedule_part=(5, 5))
    broken = SimpleNamespace(path="b", manifest={"federation": {"round": "2", "rounds": 5}})
    with pytest.raises(OffsiteError, match="b: its federation record names no valid round"):
        round_schedule(TrainConfig(), broken)


def test_claim_tolerates_another_process_writing_the_marker(tmp_path):
    """torchrun: a second process finding the first's marker half-written is not 'someone else's files'."""
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / f".{MARKER}.x1y2.tmp").write_text("{")
    claim_checkpoint_dir(root)
    assert (root / MARKER).is_file()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ".notes.tmp").write_text("x")
    with pytest.raises(OffsiteError, match="not offsite checkpoints"):
        claim_checkpoint_dir(tmp_path / "other")


def _losses(family, corpus_file, tokenizer, **cfg):
    from offsite.training.data import load_data
    from offsite.training.loop import train

    torch.manual_seed(0)
    model = tiny_model(family)
    data = load_data(corpus_file, tokenizer, 16)
    summary = train(model, data, TrainConfig(max_steps=6, batch_size=2, learning_rate=1e-3, save_every=0, **cfg),
                    pad_id=0)  # fmt: skip
    return [h["loss"] for h in summary["history"]], model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_chunked_loss_and_checkpointing_follow_the_float32_curve(
    family, corpus_file, tokenizer
):
    reference, ref_model = _losses(family, corpus_file, tokenizer, loss_chunk_tokens=0)
    chunked, model = _losses(family, corpus_file, tokenizer, gradient_checkpointing=True)
    torch.testing.assert_close(chunked, reference, atol=1e-4, rtol=1e-4)
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    bf16, _ = _losses(family, corpus_file, tokenizer, mixed_precision="bf16")
    assert max(abs(a - b) / a for a, b in zip(reference, bf16, strict=True)) < 0.02


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma2"])
def test_bf16_holds_frozen_weights_in_bf16_and_follows_the_float32_curve(
    family, corpus_file, tokenizer
):
    """Under bf16 autocast the frozen middle is held in bf16 (half its memory); what trains keeps
    float32 master weights, and the loss curve stays the float32 one's."""
    from offsite.models.architectures import get_blocks
    from offsite.training.data import load_data
    from offsite.training.finetune import hold_frozen_weights
    from offsite.training.loop import train

    curves, models = {}, {}
    for precision in ("no", "bf16"):
        torch.manual_seed(0)
        model = tiny_model(family)
        model.requires_grad_(False)
        for block in (get_blocks(model)[0], get_blocks(model)[-1]):  # adapter, frozen middle
            block.requires_grad_(True)
        cfg = TrainConfig(max_steps=6, batch_size=2, learning_rate=1e-3, save_every=0, mixed_precision=precision)  # fmt: skip
        hold_frozen_weights(model, cfg)
        summary = train(model, load_data(corpus_file, tokenizer, 16), cfg, pad_id=0)
        curves[precision], models[precision] = [h["loss"] for h in summary["history"]], model
    assert max(abs(a - b) / a for a, b in zip(curves["no"], curves["bf16"], strict=True)) < 0.02
    params = list(models["bf16"].parameters())
    assert {p.dtype for p in params if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in params if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in models["no"].parameters()} == {torch.float32}


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma2"])
@pytest.mark.parametrize("lora", [False, True])
def test_float32_checkpointing_holds_bf16_exact_frozen_matrices_in_bf16_bit_for_bit(
    family, lora, corpus_file, tokenizer
):
    """With low_memory, frozen block matrices that a bf16 bundle gave are stored in bf16 and widened
    as each block runs: the same float32 arithmetic (identical losses and trained weights), half
    their memory; without it, nothing changes."""
    from offsite.artefacts.peft_delta import PeftOptions, attach
    from offsite.models.architectures import get_blocks
    from offsite.training.data import load_data
    from offsite.training.finetune import hold_frozen_weights
    from offsite.training.loop import train

    runs = {}
    for hold in (False, True):
        torch.manual_seed(0)
        model = tiny_model(family).to(torch.bfloat16).float()  # every value a bf16, as loaded
        model.requires_grad_(False)
        if lora:
            model = attach(model, PeftOptions("lora", rank=4), [0, DEPTH - 1])
        else:
            for block in (get_blocks(model)[0], get_blocks(model)[-1]):
                block.requires_grad_(True)
        cfg = TrainConfig(max_steps=3, batch_size=2, learning_rate=1e-3, save_every=0, gradient_checkpointing=True)  # fmt: skip
        hold_frozen_weights(model, cfg, low_memory=hold)
        summary = train(model, load_data(corpus_file, tokenizer, 16), cfg, pad_id=0)
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        runs[hold] = ([h["loss"] for h in summary["history"]], trained, model)
    assert runs[True][0] == runs[False][0]
    assert runs[True][1].keys() == runs[False][1].keys()
    assert all(torch.equal(runs[True][1][n], runs[False][1][n]) for n in runs[False][1])
    stored = {p.dtype for n, p in runs[True][2].named_parameters() if n.endswith(".original")}
    assert stored == {torch.bfloat16}
    assert {p.dtype for p in runs[False][2].parameters()} == {torch.float32}


def test_weights_that_are_not_bf16_values_stay_float32(corpus_file, tokenizer):
    from offsite.training.finetune import hold_frozen_weights

    model = tiny_model("llama")  # random float32 values: bf16 would round them
    model.requires_grad_(False)
    hold_frozen_weights(
        model, TrainConfig(max_steps=1, gradient_checkpointing=True), low_memory=True
    )
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any(".original" in n for n, _ in model.named_parameters())
