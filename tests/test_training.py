import pytest
import torch
from safetensors.torch import load_file
from tiny import DEPTH, tiny_model

from offsite.artefacts.adapter import WEIGHTS_NAME
from offsite.emulator.package import package_emulator
from offsite.emulator.plan import make_plan
from offsite.errors import OffsiteError
from offsite.training.checkpoint import MARKER, claim_checkpoint_dir
from offsite.training.finetune import FinetuneJob, finetune_bundle
from offsite.training.loop import TrainConfig, epoch_batches

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

    with pytest.raises(OffsiteError, match="a checkpoint exists; pass --resume"):
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


@pytest.mark.parametrize("kwargs, message", [({"batch_size": 0}, "--batch-size"), ({"lr_scheduler": "x"}, "--lr-scheduler"),
                                             ({"mixed_precision": "fp8"}, "--mixed-precision"), ({"max_steps": 0}, "--max-steps")])  # fmt: skip
def test_invalid_training_config(kwargs, message):
    with pytest.raises(OffsiteError, match=message):
        TrainConfig(**kwargs)


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
