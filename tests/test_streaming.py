"""Big-model paths on tiny sharded models: packaging and merging tensor by tensor, dtypes kept."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import expect_error
from tiny import CORPUS, DEPTH, FAMILIES, tiny_model
from transformers import AutoModelForCausalLM

from offsite.artefacts.bundle import MANIFEST_NAME
from offsite.artefacts.merge import MergeSpec, merge
from offsite.artefacts.shards import INDEX, tensor_map
from offsite.emulator.layerwise import LayerwiseConfig  # noqa: F401  (the default recipe uses it)
from offsite.emulator.package import PackageSpec, package
from offsite.emulator.recipe import EmulatorRecipe
from offsite.training.config import TrainConfig
from offsite.training.finetune import FinetuneJob, finetune_bundle
from owner.cli import main as owner

FORWARD_FREE = EmulatorRecipe(selection="uniform", layerwise=None)


def _save(family, dtype, path, tokenizer):
    tiny_model(family).to(dtype).save_pretrained(path, max_shard_size="60KB")
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma2", "phi3", "bloom", "gpt_neox"])
def test_streaming_package_equals_the_in_memory_one(family, dtype, tokenizer, tmp_path):
    source = _save(family, dtype, tmp_path / "full", tokenizer)
    bundles = {}
    for stream in (False, True):
        spec = PackageSpec(out=tmp_path / f"b{int(stream)}", model=str(source), emulator_layers=2,
                           recipe=FORWARD_FREE, stream=stream)  # fmt: skip
        bundles[stream] = package(spec)
    loaded = {s: AutoModelForCausalLM.from_pretrained(b.path) for s, b in bundles.items()}
    assert loaded[True].dtype == dtype == loaded[False].dtype
    a, b = loaded[False].state_dict(), loaded[True].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    configs = [
        {k: v for k, v in loaded[s].config.to_dict().items() if k != "_name_or_path"}
        for s in (False, True)
    ]
    assert configs[0] == configs[1]
    ma, mb = (json.loads((bundles[s].path / MANIFEST_NAME).read_text()) for s in (False, True))
    for key in ("base_model", "blocks", "emulator"):
        assert ma[key] == mb[key], key
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded[True](ids).logits, loaded[False](ids).logits)


def test_streamed_bundle_is_sharded_trains_and_merges_back(tokenizer, tmp_path, monkeypatch):
    import offsite.artefacts.shards as shards

    source = _save("llama", torch.bfloat16, tmp_path / "full", tokenizer)
    real = shards.write_entries
    monkeypatch.setattr(
        "offsite.emulator.streamed.write_entries", lambda out, tensors: real(out, tensors, 20_000)
    )
    bundle = package(PackageSpec(out=tmp_path / "b", model=str(source), emulator_layers=2, recipe=FORWARD_FREE,
                                 stream=True))  # fmt: skip
    assert (bundle.path / INDEX).is_file() and len(
        {e.file for e in tensor_map(bundle.path).values()}
    ) > 1
    (tmp_path / "d.txt").write_text(CORPUS)
    job = FinetuneJob(tmp_path / "d.txt", tmp_path / "a", block_size=16, val_fraction=0.0)
    finetune_bundle(bundle, job, TrainConfig(max_steps=2, batch_size=2, learning_rate=1e-2))
    record = merge(
        MergeSpec(
            tmp_path / "a", tmp_path / "b", tmp_path / "m", model=str(source), allow_unsigned=True
        )
    )
    assert record["written"].startswith("streaming")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert merged.dtype == torch.bfloat16 and len(merged.model.layers) == DEPTH


@pytest.mark.parametrize("fallback", ["not between these files", "no such call"])
def test_bundle_bytes_are_the_same_when_the_kernel_cannot_copy(fallback, tokenizer, tmp_path, monkeypatch):  # fmt: skip
    # tensors are byte-copied in the kernel (copy_file_range) where it can; else through a buffer
    import errno
    import os

    source = _save("llama", torch.bfloat16, tmp_path / "full", tokenizer)

    def weights(out):
        bundle = package(PackageSpec(out=tmp_path / out, model=str(source), emulator_layers=2,
                                     recipe=FORWARD_FREE, stream=True))  # fmt: skip
        return {p.name: p.read_bytes() for p in bundle.path.glob("*.safetensors")}

    kernel = weights("kernel")
    if fallback == "no such call":
        monkeypatch.delattr(os, "copy_file_range")
    else:

        def refuse(*args):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    assert weights("buffered") == kernel and kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_selection_and_layerwise_fitting_equal_the_in_memory_ones(family, dtype, tokenizer, corpus_file, tmp_path):  # fmt: skip
    """Redundancy selection and layer-wise fitting run one block at a time give the in-memory
    recipe's blocks and fitted weights."""
    from offsite.emulator.layerwise import distill_layerwise
    from offsite.emulator.package import package_emulator
    from offsite.emulator.plan import make_plan
    from offsite.emulator.selection import block_stats, select_plan
    from offsite.training.data import load_data

    source = _save(family, dtype, tmp_path / "full", tokenizer)
    cfg = LayerwiseConfig(steps=8, learning_rate=3e-3)
    recipe = EmulatorRecipe(selection_data=corpus_file, block_size=16, layerwise=cfg)
    streamed = package(PackageSpec(out=tmp_path / "s", model=str(source), emulator_layers=2, recipe=recipe, stream=True))  # fmt: skip
    full = AutoModelForCausalLM.from_pretrained(source)
    sample = load_data(corpus_file, tokenizer, 16)
    plan = select_plan(make_plan(DEPTH, emulator_layers=2), "redundancy", block_stats(full, sample))
    emulator, _ = distill_layerwise(full, plan, sample, cfg)
    in_memory = package_emulator(
        full, tokenizer, plan, tmp_path / "m", base_name="m", emulator=emulator
    )
    record = streamed.manifest["emulator_recipe"]
    assert record["selection"]["kept"] == list(plan.kept) and record["layerwise"]["spans"]
    assert streamed.base_fingerprint == in_memory.base_fingerprint
    a = AutoModelForCausalLM.from_pretrained(in_memory.path).state_dict()
    b = AutoModelForCausalLM.from_pretrained(streamed.path).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == dtype
        assert torch.equal(b[k], a[k]), k


def test_stream_refuses_recipes_that_need_the_whole_model(tokenizer, tmp_path, capsys):
    source = _save("llama", torch.float32, tmp_path / "full", tokenizer)
    base = [
        "package-emulator",
        "--model",
        str(source),
        "--out",
        str(tmp_path / "b"),
        "--emulator-layers",
        "2",
        "--stream",
    ]
    expect_error(capsys, owner, [*base, "--selection", "similarity"], "--selection similarity",
                 tmp_path / "b")  # fmt: skip
    expect_error(capsys, owner, [*base, "--layerwise-noise", "0.1"], "layer-wise noise", tmp_path / "b")  # fmt: skip
    expect_error(capsys, owner, [*base, "--selection", "uniform", "--layerwise-steps", "0", "--dtype", "float16"],
                 "--dtype converts", tmp_path / "b")  # fmt: skip
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")  # refused before it is read: a GGUF is converted, never streamed
    expect_error(capsys, owner, [*base, "--model", str(gguf), "--selection", "uniform", "--layerwise-steps", "0"],
                 "model.gguf is a GGUF file, dequantised to bfloat16", tmp_path / "b")  # fmt: skip
    assert owner([*base, "--selection", "uniform", "--layerwise-steps", "0"]) == 0
