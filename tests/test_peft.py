"""PEFT inside the adapter: each method on the tiny-model matrix, the delta as peft loads it, and
the checks that keep a forged PEFT config or delta out of the owner's model."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import expect_error
from peft import PeftModel
from safetensors.torch import load_file, save_file
from tiny import CORPUS, DEPTH, FAMILIES, VOCAB, save_tiny, tiny_model
from transformers import AutoModelForCausalLM

from data_owner.cli import main as data_owner
from offsite.artefacts.adapter import (
    ADAPTER_MANIFEST,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    open_adapter,
    save_adapter,
)
from offsite.artefacts.merge import PROMPT_DIR, MergeSpec, merge
from offsite.artefacts.peft_delta import (
    PeftOptions,
    attach,
    delta_state,
    full_config,
    plug_delta,
    verify_delta,
)
from offsite.atomic import sha256_file
from offsite.emulator.package import package_emulator
from offsite.emulator.plan import make_plan
from offsite.errors import OffsiteError, VerificationError
from offsite.training.config import TrainConfig
from offsite.training.finetune import FinetuneJob, finetune_bundle
from offsite.training.loss import batch_nll, chunked_lm_loss, lm_loss
from owner.cli import main as owner

INPUT = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
ADAPTER_BLOCKS = {0, 1, DEPTH - 2, DEPTH - 1}


def _setup(family, tokenizer, tmp_path):
    save_tiny(family, tmp_path / "full")
    plan = make_plan(DEPTH, emulator_layers=2)
    bundle = package_emulator(tiny_model(family), tokenizer, plan, tmp_path / "b", base_name=family)
    (tmp_path / "d.txt").write_text(CORPUS)
    return bundle


def _finetune(bundle, tmp_path, options, steps=3):  # options None: whole adapter blocks
    job = FinetuneJob(
        tmp_path / "d.txt", tmp_path / "a", block_size=16, val_fraction=0.1, peft=options
    )
    return finetune_bundle(
        bundle, job, TrainConfig(max_steps=steps, learning_rate=1e-2, batch_size=2)
    )


def _logits(model, ids=INPUT):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def _block_of(key: str) -> int | None:
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit() and parts[i - 1] in ("layers", "h"):
            return int(part)
    return None


@pytest.mark.parametrize("method", ["lora", "ia3", "ln"])
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_delta_loads_in_peft_and_merges_to_the_same_logits(
    family, method, tokenizer, tmp_path
):
    bundle = _setup(family, tokenizer, tmp_path)
    adapter = _finetune(bundle, tmp_path, PeftOptions(method))
    delta = load_file(str(tmp_path / "a" / PEFT_WEIGHTS))
    assert {_block_of(k) for k in delta} == ADAPTER_BLOCKS, (
        "the delta touches the adapter blocks only"
    )
    assert adapter.manifest["training"]["trainable_parameters"] == sum(
        v.numel() for v in delta.values()
    )
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    base = {k: v.clone() for k, v in full.state_dict().items()}
    via_peft = _logits(PeftModel.from_pretrained(full, tmp_path / "a"))
    merge(MergeSpec(tmp_path / "a", tmp_path / "b", tmp_path / "m", model=str(tmp_path / "full"),
                    allow_unsigned=True))  # fmt: skip
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(_logits(merged), via_peft, atol=1e-5, rtol=1e-4)
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, base[k])}
    assert changed and {_block_of(k) for k in changed} <= ADAPTER_BLOCKS
    record = json.loads((tmp_path / "m" / "offsite_merge.json").read_text())
    assert record["peft"]["method"] == method


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_prompt_tuning_keeps_the_model_and_ships_the_prompt(family, tokenizer, tmp_path):
    bundle = _setup(family, tokenizer, tmp_path)
    _finetune(bundle, tmp_path, PeftOptions("prompt", virtual_tokens=3))
    assert set(load_file(str(tmp_path / "a" / PEFT_WEIGHTS))) == {"prompt_embeddings"}
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    via_peft = _logits(PeftModel.from_pretrained(full, tmp_path / "a"))
    merge(MergeSpec(tmp_path / "a", tmp_path / "b", tmp_path / "m", model=str(tmp_path / "full"),
                    allow_unsigned=True))  # fmt: skip
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(
        _logits(merged), _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "full"))
    )
    prompted = PeftModel.from_pretrained(merged, tmp_path / "m" / PROMPT_DIR)
    torch.testing.assert_close(_logits(prompted), via_peft)
    adapter = open_adapter(tmp_path / "a")
    options, delta = verify_delta(adapter, bundle)
    plugged = plug_delta(
        AutoModelForCausalLM.from_pretrained(tmp_path / "full"), options, bundle, delta
    )
    torch.testing.assert_close(_logits(plugged), via_peft)


@pytest.mark.parametrize("method", ["lora", "ia3", "ln"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "falcon"])
def test_untouched_delta_leaves_the_full_model_unchanged(family, method, tokenizer, tmp_path):
    bundle = _setup(family, tokenizer, tmp_path)
    options = PeftOptions(method).resolved(bundle.manifest["base_model"]["model_type"])
    emulator = attach(bundle.load_model(), options, bundle.adapter_positions)
    save_adapter(delta_state(emulator, bundle), bundle, tmp_path / "a", training={},
                 peft=(options.to_json(), full_config(options, bundle)))  # fmt: skip
    merge(MergeSpec(tmp_path / "a", tmp_path / "b", tmp_path / "m", model=str(tmp_path / "full"),
                    allow_unsigned=True))  # fmt: skip
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    torch.testing.assert_close(
        _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m")), _logits(full)
    )


def _rehash(adapter_dir, name):
    manifest = json.loads((adapter_dir / ADAPTER_MANIFEST).read_text())
    manifest["files"][name] = sha256_file(adapter_dir / name)
    (adapter_dir / ADAPTER_MANIFEST).write_text(json.dumps(manifest))


def _merge_argv(tmp_path):
    return ["merge-adapter", "--model", str(tmp_path / "full"), "--adapter", str(tmp_path / "a"),
            "--bundle", str(tmp_path / "b"), "--allow-unsigned", "--out", str(tmp_path / "m")]  # fmt: skip


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("target_modules", r"model\.layers\.(\d+)\.(?:.+\.)?(q_proj|v_proj)", "target_modules"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
        ("layers_to_transform", [2, 3], "layers_to_transform"),
        ("bias", "all", "bias"),
        ("a_future_field", {"x": 1}, "not one this owner knows"),
    ],
)
def test_forged_peft_config_is_refused_by_merge(field, value, message, tokenizer, tmp_path, capsys):
    bundle = _setup("llama", tokenizer, tmp_path)
    _finetune(bundle, tmp_path, PeftOptions("lora"), steps=1)
    config = json.loads((tmp_path / "a" / PEFT_CONFIG).read_text())
    config[field] = value
    (tmp_path / "a" / PEFT_CONFIG).write_text(json.dumps(config))
    _rehash(tmp_path / "a", PEFT_CONFIG)
    expect_error(capsys, owner, _merge_argv(tmp_path), message, tmp_path / "m")


def test_delta_outside_the_adapter_blocks_is_refused(tokenizer, tmp_path, capsys):
    bundle = _setup("llama", tokenizer, tmp_path)
    _finetune(bundle, tmp_path, PeftOptions("lora"), steps=1)
    delta = load_file(str(tmp_path / "a" / PEFT_WEIGHTS))
    for key in [k for k in delta if ".layers.0." in k]:
        delta[key.replace(".layers.0.", ".layers.3.")] = delta[key].clone()
    save_file(delta, str(tmp_path / "a" / PEFT_WEIGHTS))
    _rehash(tmp_path / "a", PEFT_WEIGHTS)
    with pytest.raises(VerificationError, match="unexpected"):
        verify_delta(open_adapter(tmp_path / "a"), bundle)
    expect_error(capsys, owner, _merge_argv(tmp_path), "unexpected", tmp_path / "m")


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_loss_equals_the_models_own_loss(family, tokenizer):
    model = tiny_model(family)
    ids = INPUT.clone()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    batch["labels"][0, :4] = -100
    reference = lm_loss(model, batch)
    chunked = chunked_lm_loss(5)(model, batch)
    torch.testing.assert_close(chunked, reference, atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad(loss, model.lm_head.weight if hasattr(model, "lm_head") else
                                 model.get_output_embeddings().weight) for loss in (reference, chunked)]  # fmt: skip
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # validation's summed NLL, in chunks and whole
        (plain, n), (parts, m) = batch_nll(model, batch), batch_nll(model, batch, chunk_tokens=5)
    torch.testing.assert_close(parts, plain, atol=1e-4, rtol=1e-5)
    assert int(n) == int(m)


def test_chunked_loss_with_a_soft_prompt_equals_peft_loss(tokenizer, tmp_path):
    bundle = _setup("llama", tokenizer, tmp_path)
    model = attach(
        bundle.load_model(), PeftOptions("prompt", virtual_tokens=3), bundle.adapter_positions
    )
    batch = {"input_ids": INPUT, "attention_mask": torch.ones_like(INPUT), "labels": INPUT.clone()}
    torch.testing.assert_close(
        chunked_lm_loss(7)(model, batch), lm_loss(model, batch), atol=1e-5, rtol=1e-5
    )
    with torch.no_grad():
        torch.testing.assert_close(batch_nll(model, batch, 7), batch_nll(model, batch))


def test_bad_peft_options_get_one_line_errors(tokenizer, tmp_path, capsys):
    _setup("llama", tokenizer, tmp_path)
    base = ["finetune", "--bundle", str(tmp_path / "b"), "--data", str(tmp_path / "d.txt"),
            "--out", str(tmp_path / "a"), "--max-steps", "1", "--block-size", "16"]  # fmt: skip
    expect_error(
        capsys,
        data_owner,
        [*base, "--peft", "lora", "--lora-rank", "0"],
        "--lora-rank",
        tmp_path / "a",
    )
    expect_error(capsys, data_owner, [*base, "--peft", "lora", "--peft-targets", "q_proj;rm"],
                 "--peft-targets", tmp_path / "a")  # fmt: skip
    expect_error(capsys, data_owner, [*base, "--peft", "lora", "--peft-targets", "no_such_proj"],
                 "--peft lora", tmp_path / "a")  # fmt: skip
    expect_error(
        capsys, data_owner, [*base, "--peft", "bitfit"], "have no bias parameters", tmp_path / "a"
    )
    with pytest.raises(OffsiteError, match="`method` 'adapterdrop' unknown"):
        PeftOptions("adapterdrop")


@pytest.mark.parametrize("family", ["gpt2", "opt", "bloom"])
def test_bitfit_returns_and_merges_only_the_adapter_blocks_biases(family, tokenizer, tmp_path):
    bundle = _setup(family, tokenizer, tmp_path)
    adapter = _finetune(bundle, tmp_path, PeftOptions("bitfit"))
    assert adapter.kind == "blocks" and adapter.trained == "bias"
    state = load_file(str(adapter.weights))
    assert state and all(k.endswith(".bias") for k in state)
    assert {_block_of(k) for k in state} == ADAPTER_BLOCKS
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    merge(MergeSpec(tmp_path / "a", tmp_path / "b", tmp_path / "m", model=str(tmp_path / "full"),
                    allow_unsigned=True))  # fmt: skip
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    changed = {k for k, v in full.state_dict().items() if not torch.equal(v, merged[k])}
    assert changed and changed <= set(state)
    assert json.loads((tmp_path / "m" / "offsite_merge.json").read_text())["trained"] == "bias"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", [None, "lora", "ia3"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma2", "gpt_neox"])
def test_streaming_merge_equals_the_in_memory_merge(family, method, dtype, tokenizer, tmp_path):
    from offsite.artefacts.shards import tensor_map

    tiny_model(family).to(dtype).save_pretrained(tmp_path / "full", max_shard_size="60KB")
    tokenizer.save_pretrained(tmp_path / "full")
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    assert full.dtype == dtype
    bundle = package_emulator(full, tokenizer, make_plan(DEPTH, emulator_layers=2), tmp_path / "b",
                              base_name=family)  # fmt: skip
    assert {v.dtype for v in load_file(str(tmp_path / "b" / "model.safetensors")).values()} == {
        dtype
    }
    (tmp_path / "d.txt").write_text(CORPUS)
    adapter = _finetune(bundle, tmp_path, PeftOptions(method) if method else None, steps=2)
    if method is None:
        assert {v.dtype for v in load_file(str(adapter.weights)).values()} == {dtype}
    runs = {}
    for how, kw in (("stream", {}), ("loaded", {"dtype": dtype})):
        out = tmp_path / how
        record = merge(MergeSpec(tmp_path / "a", tmp_path / "b", out, model=str(tmp_path / "full"),
                                 allow_unsigned=True, **kw))  # fmt: skip
        assert record["written"].startswith({"stream": "streaming", "loaded": "loaded"}[how])
        assert torch.get_default_dtype() == torch.float32, "torch's default dtype is left as it was"
        runs[how] = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert runs["stream"].keys() == runs["loaded"].keys()
    for k, v in runs["stream"].items():
        assert v.dtype == dtype and torch.equal(v, runs["loaded"][k]), k
    source, merged = tensor_map(tmp_path / "full"), tensor_map(tmp_path / "stream")
    assert [p.name for p in sorted({e.file for e in merged.values()})] == [
        p.name for p in sorted({e.file for e in source.values()})
    ]
    for name, e in source.items():
        same = (tmp_path / "full" / e.file.name).read_bytes()[e.start : e.end] == merged[
            name
        ].file.read_bytes()[merged[name].start : merged[name].end]
        assert same or _block_of(name) in ADAPTER_BLOCKS, name


def test_ia3_on_chosen_targets_without_a_feedforward_one_round_trips(tokenizer, tmp_path):
    bundle = _setup("llama", tokenizer, tmp_path)
    _finetune(bundle, tmp_path, PeftOptions("ia3", targets=("k_proj", "v_proj")), steps=1)
    config = json.loads((tmp_path / "a" / PEFT_CONFIG).read_text())
    assert config["feedforward_modules"] == []
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    via_peft = _logits(PeftModel.from_pretrained(full, tmp_path / "a"))
    merge(MergeSpec(tmp_path / "a", tmp_path / "b", tmp_path / "m", model=str(tmp_path / "full"),
                    allow_unsigned=True))  # fmt: skip
    torch.testing.assert_close(
        _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m")), via_peft
    )


def _forge(tmp_path, bundle, **peft):
    """The trained LoRA adapter with its manifest's PEFT options (and the config they imply) changed."""
    manifest = json.loads((tmp_path / "a" / ADAPTER_MANIFEST).read_text())
    manifest["peft"].update(peft)
    config = json.loads((tmp_path / "a" / PEFT_CONFIG).read_text())
    options = PeftOptions(**{**manifest["peft"], "targets": tuple(manifest["peft"]["targets"])})
    config.update(full_config(options, bundle))
    (tmp_path / "a" / PEFT_CONFIG).write_text(json.dumps(config))
    manifest["files"][PEFT_CONFIG] = sha256_file(tmp_path / "a" / PEFT_CONFIG)
    (tmp_path / "a" / ADAPTER_MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("alpha", ["1e300", "Infinity"])
def test_a_lora_alpha_that_is_not_a_sane_number_is_refused(alpha, tokenizer, tmp_path, capsys):
    """Issue 26: alpha 1e300 or Infinity was verified and merged into inf/NaN weights."""
    bundle = _setup("llama", tokenizer, tmp_path)
    _finetune(bundle, tmp_path, PeftOptions("lora"), steps=1)
    text = (tmp_path / "a" / ADAPTER_MANIFEST).read_text()
    manifest = json.loads(text)
    manifest["peft"]["alpha"] = 12345.0
    (tmp_path / "a" / ADAPTER_MANIFEST).write_text(json.dumps(manifest).replace("12345.0", alpha))
    with pytest.raises(VerificationError, match="alpha"):
        verify_delta(open_adapter(tmp_path / "a"), bundle)
    expect_error(capsys, owner, _merge_argv(tmp_path), "alpha", tmp_path / "m")


def test_finite_lora_factors_whose_product_overflows_are_refused(tokenizer, tmp_path, capsys):
    bundle = _setup("llama", tokenizer, tmp_path)
    _finetune(bundle, tmp_path, PeftOptions("lora"), steps=1)
    delta = load_file(str(tmp_path / "a" / PEFT_WEIGHTS))
    save_file(
        {k: torch.full_like(v, 1e19) for k, v in delta.items()}, str(tmp_path / "a" / PEFT_WEIGHTS)
    )
    _rehash(tmp_path / "a", PEFT_WEIGHTS)
    with pytest.raises(VerificationError, match="not finite"):
        verify_delta(open_adapter(tmp_path / "a"), bundle)
    expect_error(capsys, owner, _merge_argv(tmp_path), "not finite", tmp_path / "m")


@pytest.mark.parametrize("targets", [["self_attn"], ["nonexistent_proj"]])
def test_peft_targets_that_name_no_linear_module_are_a_verification_error(
    targets, tokenizer, tmp_path, capsys
):
    """Issue 26: a ValueError from peft escaped verification (UNKNOWN on the wire, a merge traceback)."""
    bundle = _setup("llama", tokenizer, tmp_path)
    _finetune(bundle, tmp_path, PeftOptions("lora"), steps=1)
    _forge(tmp_path, bundle, targets=targets)
    with pytest.raises(VerificationError, match="do not apply"):
        verify_delta(open_adapter(tmp_path / "a"), bundle)
    expect_error(capsys, owner, _merge_argv(tmp_path), "do not apply", tmp_path / "m")


def test_the_methods_table_says_each_method_once_and_consistently():
    """What trains, its default targets, its peft config, whether it is weights: one row each."""
    from dataclasses import fields

    from offsite.artefacts.peft_methods import METHODS
    from offsite.models.architectures import PeftTargets

    registry = {f.name for f in fields(PeftTargets)}
    for m in METHODS.values():
        assert m.modules == (m.own_parameters is None), m.name  # peft modules, or the blocks' own
        assert m.targets is None or m.targets in registry, m.name
        assert m.in_weights or m.modules, m.name  # only a peft tuner can live beside the weights
        assert m.trains
