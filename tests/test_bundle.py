import json

import pytest
import torch
from safetensors import safe_open
from tiny import DEPTH, FAMILIES, VOCAB, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from offsite.artefacts.bundle import MANIFEST_NAME, open_bundle
from offsite.emulator.build import build_emulator
from offsite.emulator.package import package_emulator
from offsite.emulator.plan import SplitPlan, make_plan
from offsite.errors import VerificationError
from offsite.models.architectures import block_prefix, get_blocks

INPUT = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_emulator_keeping_every_middle_block_matches_the_full_model(family):
    model = tiny_model(family)
    plan = SplitPlan(DEPTH, (0, 1, 6, 7), (2, 3, 4, 5))
    with torch.no_grad():
        assert torch.equal(build_emulator(model, plan)(INPUT).logits, model(INPUT).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_dropping_blocks_changes_the_model_and_leaves_the_original_intact(family):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    emulator = build_emulator(model, make_plan(DEPTH, emulator_layers=2))
    with torch.no_grad():
        assert not torch.allclose(emulator(INPUT).logits, model(INPUT).logits)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(get_blocks(model)) == DEPTH
    full_storage = {p.data_ptr() for p in model.parameters()}
    assert not full_storage & {p.data_ptr() for p in emulator.parameters()}, "weights are copied"
    with torch.no_grad():  # training the emulator cannot reach the full model
        for p in emulator.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
def test_bundle_is_a_plain_hf_model_without_dropped_weights(family, tokenizer, tmp_path):
    model = tiny_model(family)
    plan = make_plan(DEPTH, emulator_layers=2)  # keeps 2 and 5, drops 3 and 4
    full_state = {k: v.clone() for k, v in model.state_dict().items()}
    expected = build_emulator(model, plan)
    bundle = package_emulator(model, tokenizer, plan, tmp_path / "b", base_name="tiny")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    AutoTokenizer.from_pretrained(tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(loaded(INPUT).logits, expected(INPUT).logits)
    out = loaded.generate(INPUT[:1, :4], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 10)

    prefix = block_prefix(model.config.model_type)
    dropped = [
        full_state[k]
        for k in full_state
        if any(k.startswith(f"{prefix}.{i}.") for i in plan.dropped)
    ]
    assert dropped
    with safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as f:
        stored = [f.get_tensor(k) for k in f.keys()]
        depth_ids = {
            int(k[len(prefix) + 1 :].split(".")[0]) for k in f.keys() if k.startswith(prefix + ".")
        }
    assert depth_ids == set(range(len(plan.emulator_order)))
    for t in dropped:
        assert not any(s.shape == t.shape and torch.equal(s, t) for s in stored)

    m = bundle.manifest
    assert m["format_version"] == 1 and m["base_model"]["num_layers"] == DEPTH
    assert [b["source"] for b in m["blocks"]] == list(plan.emulator_order)
    assert [b["source"] for b in m["blocks"] if b["role"] == "adapter"] == list(plan.adapter)
    assert m["emulator"]["dropped"] == list(plan.dropped)
    assert "model.safetensors" in m["files"] and "config.json" in m["files"]


def _bundle(tmp_path, tokenizer):
    return package_emulator(
        tiny_model("llama"),
        tokenizer,
        make_plan(DEPTH, emulator_layers=2),
        tmp_path / "b",
        base_name="t",
    )


def test_tampered_bundle_file_is_rejected_unless_only_the_manifest_is_read(tmp_path, tokenizer):
    """A merge reads only the bundle's manifest (the adapter names it by its hash): it need not
    hash the emulator's weights, but every other check still holds."""
    _bundle(tmp_path, tokenizer)
    weights = tmp_path / "b" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="model.safetensors: sha256 does not match"):
        open_bundle(tmp_path / "b")
    manifest = (tmp_path / "b" / MANIFEST_NAME).read_bytes()
    assert open_bundle(tmp_path / "b", weights=False).manifest == json.loads(manifest)
    config = tmp_path / "b" / "config.json"
    saved = config.read_bytes()
    config.write_text("{}")
    with pytest.raises(VerificationError, match="config.json: sha256 does not match"):
        open_bundle(tmp_path / "b", weights=False)
    config.write_bytes(saved)
    weights.unlink()
    with pytest.raises(
        VerificationError, match="model.safetensors: listed in the manifest but missing"
    ):
        open_bundle(tmp_path / "b", weights=False)


def test_missing_and_extra_bundle_files_are_rejected(tmp_path, tokenizer):
    _bundle(tmp_path, tokenizer)
    (tmp_path / "b" / "extra.py").write_text("print('hi')")
    with pytest.raises(VerificationError, match="not listed in the manifest: extra.py"):
        open_bundle(tmp_path / "b")
    (tmp_path / "b" / "extra.py").unlink()
    (tmp_path / "b" / "config.json").unlink()
    with pytest.raises(VerificationError, match="config.json: listed in the manifest but missing"):
        open_bundle(tmp_path / "b")


def test_manifest_with_unsafe_names_or_wrong_version_is_rejected(tmp_path, tokenizer):
    _bundle(tmp_path, tokenizer)
    path = tmp_path / "b" / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(VerificationError, match="format_version 99 is not supported"):
        open_bundle(tmp_path / "b")
    path.write_text(json.dumps({**manifest, "files": {"../x": "0" * 64}}))
    with pytest.raises(VerificationError, match="unsafe file name '../x'"):
        open_bundle(tmp_path / "b")
