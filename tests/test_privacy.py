"""DP-SGD for the data owner: the reported epsilon is opacus's, per-sample gradients are clipped,
the guarantee travels in the signed manifest to the merge record, bad options are one line."""

from __future__ import annotations

import pytest
import torch
from helpers import expect_error
from tiny import CORPUS, DEPTH, save_tiny, tiny_model

from data_owner.cli import main as data_owner
from offsite.artefacts.merge import MergeSpec, merge
from offsite.artefacts.peft_delta import PeftOptions
from offsite.emulator.package import package_emulator
from offsite.emulator.plan import make_plan
from offsite.errors import OffsiteError
from offsite.training.config import TrainConfig
from offsite.training.finetune import FinetuneJob, finetune_bundle
from offsite.training.privacy import DPConfig, noise_multiplier, privatize


@pytest.fixture
def flow(tokenizer, tmp_path):
    save_tiny("llama", tmp_path / "full")
    package_emulator(
        tiny_model("llama"),
        tokenizer,
        make_plan(DEPTH, emulator_layers=2),
        tmp_path / "b",
        base_name="t",
    )
    (tmp_path / "d.txt").write_text(CORPUS * 4)
    return tmp_path


@pytest.mark.parametrize("peft", [None, "lora"])
def test_dp_finetune_reports_opacus_epsilon_and_the_merge_records_it(flow, peft):
    from opacus.accountants import RDPAccountant

    from offsite.artefacts.bundle import open_bundle

    dp = DPConfig(epsilon=8.0, delta=1e-5, max_grad_norm=0.5)
    job = FinetuneJob(
        flow / "d.txt",
        flow / "a",
        block_size=16,
        val_fraction=0.0,
        peft=PeftOptions(peft) if peft else None,
    )
    adapter = finetune_bundle(
        open_bundle(flow / "b"),
        job,
        TrainConfig(max_steps=4, batch_size=2, learning_rate=1e-3, dp=dp),
    )
    report = adapter.manifest["training"]["differential_privacy"]
    n = adapter.manifest["training"]["train_examples"]
    assert report["sample_rate"] == 2 / n and report["steps"] == 4
    assert report["noise_multiplier"] == pytest.approx(noise_multiplier(dp, 2 / n, 4), rel=1e-5)
    accountant = RDPAccountant()
    accountant.history = [(report["noise_multiplier"], 2 / n, 4)]
    assert report["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), abs=1e-3)
    assert report["epsilon"] <= 8.0 + 1e-3 and report["accountant"] == "opacus rdp"
    record = merge(
        MergeSpec(flow / "a", flow / "b", flow / "m", model=str(flow / "full"), allow_unsigned=True)
    )
    assert record["differential_privacy"]["epsilon"] == report["epsilon"]


def test_dp_noise_and_batch_order_cannot_be_rebuilt_from_the_seed(flow, monkeypatch):
    """--seed is in the signed manifest: under DP neither the noise nor which records a step drew
    may follow from it (else the owner could subtract the noise), so two runs with one seed differ;
    the secret order is kept in the local checkpoint only, so a resumed run keeps drawing from it."""
    from safetensors.torch import load_file

    import offsite.training.loop as loop
    from offsite.artefacts.adapter import WEIGHTS_NAME
    from offsite.artefacts.bundle import open_bundle

    orders = []
    real = loop._micro_batches
    monkeypatch.setattr(
        loop,
        "_micro_batches",
        lambda data, order, *a: orders.append(order.seed) or real(data, order, *a),
    )
    cfg = TrainConfig(max_steps=3, batch_size=2, learning_rate=1e-3, save_every=2, seed=7,
                      dp=DPConfig(epsilon=8.0, delta=1e-5))  # fmt: skip
    weights = []
    for name in ("a1", "a2"):
        job = FinetuneJob(
            flow / "d.txt", flow / name, block_size=16, val_fraction=0.0, keep_checkpoints=True
        )
        adapter = finetune_bundle(open_bundle(flow / "b"), job, cfg)
        weights.append(load_file(str(adapter.path / WEIGHTS_NAME)))
        assert adapter.manifest["training"]["differential_privacy"]["randomness"].startswith(
            "batch order and noise"
        )
        assert str(orders[-1]) not in (adapter.path / "adapter_manifest.json").read_text()
    assert 7 not in orders and orders[0] != orders[1], (
        "the order comes from a fresh secret, not --seed"
    )
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), (
        "fresh noise each run"
    )
    state = loop.read_checkpoint_state(flow / "a2.ckpt")
    assert state["step"] == 2 and state["order_seed"] == orders[-1]
    assert loop._dp_order_seed(flow / "a2.ckpt", 2) == orders[-1]  # a resumed run keeps its order


def test_per_sample_gradients_are_clipped_before_they_are_summed():
    model = tiny_model("llama")
    model.requires_grad_(False)
    for p in model.model.layers[0].parameters():
        p.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    wrapped, dp_optimizer, _ = privatize(
        model, optimizer, DPConfig(8.0, 1e-5, max_grad_norm=0.01), 3, 0.1, 10
    )
    ids = torch.randint(3, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    wrapped(input_ids=ids, labels=ids).loss.backward()
    per_sample = [p.grad_sample.clone() for p in params]
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in per_sample]).norm(dim=0)
    assert (norms > 0.01).all(), "the test needs gradients above the clip norm"
    dp_optimizer.clip_and_accumulate()
    factors = (0.01 / (norms + 1e-6)).clamp(max=1.0)
    for p, g in zip(params, per_sample, strict=True):
        torch.testing.assert_close(
            p.summed_grad, torch.einsum("i,i...->...", factors, g), atol=1e-6, rtol=1e-4
        )


def test_bad_dp_options_get_one_line_errors(flow, capsys):
    base = ["finetune", "--bundle", str(flow / "b"), "--data", str(flow / "d.txt"), "--out", str(flow / "a"),
            "--max-steps", "1", "--block-size", "16"]  # fmt: skip
    expect_error(
        capsys,
        data_owner,
        [*base, "--dp-epsilon", "0"],
        "--dp-epsilon 0.0 must be a finite number > 0",
        flow / "a",
    )
    expect_error(
        capsys,
        data_owner,
        [*base, "--dp-delta", "1e-5"],
        "--dp-delta needs --dp-epsilon",
        flow / "a",
    )
    expect_error(
        capsys,
        data_owner,
        [*base, "--dp-epsilon", "8", "--dp-delta", "2"],
        "--dp-delta 2.0",
        flow / "a",
    )
    expect_error(
        capsys,
        data_owner,
        [*base, "--dp-epsilon", "8", "--max-grad-norm", "0"],
        "--max-grad-norm",
        flow / "a",
    )
    expect_error(
        capsys,
        data_owner,
        [*base, "--dp-epsilon", "8", "--grad-accum", "2"],
        "without --grad-accum",
        flow / "a",
    )
    with pytest.raises(OffsiteError, match="`accountant`"):
        DPConfig(8.0, 1e-5, accountant="moments")
