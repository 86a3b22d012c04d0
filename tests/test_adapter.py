import pytest
import torch
from safetensors.torch import load_file
from tiny import DEPTH, FAMILIES, VOCAB, tiny_model

from offsite.artefacts.adapter import (
    WEIGHTS_NAME,
    extract_adapter,
    open_adapter,
    plug_adapter,
    plug_into_emulator,
    save_adapter,
)
from offsite.artefacts.merge import verify_adapter
from offsite.artefacts.tensorcheck import all_finite
from offsite.emulator.package import package_emulator
from offsite.emulator.plan import make_plan
from offsite.models.architectures import block_prefix
from offsite.models.fingerprint import model_fingerprint
from offsite.training.config import TrainConfig
from offsite.training.finetune import FinetuneJob, finetune_bundle

INPUT = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


def _package(family, tokenizer, tmp_path):
    model = tiny_model(family)
    bundle = package_emulator(
        tiny_model(family),
        tokenizer,
        make_plan(DEPTH, emulator_layers=2),
        tmp_path / "b",
        base_name=family,
    )
    return model, bundle


@pytest.mark.parametrize("family", FAMILIES)
def test_untouched_adapter_plugs_back_to_identical_logits(family, tokenizer, tmp_path):
    model, bundle = _package(family, tokenizer, tmp_path)
    with torch.no_grad():
        base = model(INPUT).logits
    state = extract_adapter(bundle.load_model(), bundle)
    prefix = block_prefix(model.config.model_type)
    assert {int(k[len(prefix) + 1 :].split(".")[0]) for k in state} == {0, 1, 6, 7}
    adapter = save_adapter(state, bundle, tmp_path / "a", training={})
    plug_adapter(model, verify_adapter(adapter, bundle, model, model_fingerprint(model)))
    with torch.no_grad():
        assert torch.equal(model(INPUT).logits, base)


@pytest.mark.parametrize("family", FAMILIES)
def test_finetuned_adapter_changes_only_the_adapter_blocks(
    family, tokenizer, tmp_path, corpus_file
):
    model, bundle = _package(family, tokenizer, tmp_path)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    job = FinetuneJob(corpus_file, tmp_path / "a", block_size=16, val_fraction=0.0)
    adapter = finetune_bundle(
        bundle, job, TrainConfig(max_steps=3, learning_rate=1e-2, batch_size=2)
    )
    trained = load_file(str(tmp_path / "a" / WEIGHTS_NAME))

    plug_adapter(model, verify_adapter(adapter, bundle, model, model_fingerprint(model)))
    merged = model.state_dict()
    assert set(trained) <= set(merged)
    changed = {k for k in merged if not torch.equal(merged[k], base[k])}
    assert changed and changed <= set(trained), "only adapter tensors may change"
    assert all(torch.equal(merged[k], trained[k]) for k in trained)
    assert adapter.manifest["training"]["steps"] == 3
    assert not (tmp_path / "a.ckpt").exists(), "checkpoints are removed after success"

    emulator = bundle.load_model()
    plug_into_emulator(emulator, bundle, open_adapter(tmp_path / "a"))
    assert torch.equal(
        extract_adapter(emulator, bundle)[next(iter(trained))], trained[next(iter(trained))]
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_one_non_finite_value_anywhere_is_found(dtype):
    # the min/max reduction behind the check must see a single NaN or infinity wherever it lies
    shape = (33, 70)
    assert all_finite(torch.randn(shape).to(dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for pos in (0, 1000, 33 * 70 - 1):
            t = torch.randn(shape).to(dtype)
            t.view(-1)[pos] = bad
            assert not all_finite(t), (bad, pos)


def test_finiteness_of_tensors_without_a_min_max_reduction():
    assert all_finite(torch.zeros(0)) and all_finite(torch.arange(5))
    t = torch.zeros(4, dtype=torch.float8_e4m3fn)
    assert all_finite(t)
    t[2] = float("nan")
    assert not all_finite(t)
