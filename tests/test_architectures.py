import pytest
import torch
from tiny import DEPTH, FAMILIES, tiny_config, tiny_model

from offsite.errors import OffsiteError
from offsite.models.architectures import (
    ARCHITECTURES,
    arch_spec,
    check_position_independent,
    get_blocks,
    num_blocks,
    set_blocks,
)

REQUIRED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
            "phi3", "opt", "gpt2", "gpt_neox", "bloom", "falcon", "gptj"}  # fmt: skip


def test_registry_covers_the_required_families():
    assert set(ARCHITECTURES) >= REQUIRED
    assert set(FAMILIES) == set(ARCHITECTURES), "every registered family is in the test matrix"


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(OffsiteError, match="'mamba' is not supported; supported: bloom, falcon"):
        arch_spec("mamba")


def test_depth_dependent_gpt2_is_refused():
    cfg = tiny_config("gpt2")
    cfg.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(OffsiteError, match="scale_attn_by_inverse_layer_idx"):
        check_position_independent(cfg)


@pytest.mark.parametrize("family", FAMILIES)
def test_set_blocks_renumbers_cache_indices_and_slices_config(family):
    model = tiny_model(family)
    kept = [0, 3, 6, 7]
    originals = [get_blocks(model)[i] for i in kept]
    types = getattr(model.config, "layer_types", None)
    set_blocks(model, kept)
    assert num_blocks(model.config) == len(kept) == len(get_blocks(model))
    assert all(a is b for a, b in zip(get_blocks(model), originals, strict=True))
    for new_index, block in enumerate(get_blocks(model)):
        indices = {m.layer_idx for m in block.modules() if hasattr(m, "layer_idx")}
        assert indices == {new_index}
    if types is not None:
        assert model.config.layer_types == [types[i] for i in kept]
    for name, value in model.config.to_dict().items():  # no per-layer list left at the old depth
        assert not (isinstance(value, list) and len(value) == DEPTH), name
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_only_the_registry_knows_model_families():
    import re
    from pathlib import Path

    from offsite.models.architectures import supported_model_types

    root = Path(__file__).resolve().parents[1] / "offsite"
    allowed = {root / "models" / "architectures.py", root / "models" / "tiny.py"}
    names = "|".join(map(re.escape, supported_model_types()))
    pattern = re.compile(rf"""["']({names})["']""")
    offenders = [
        f"{p.relative_to(root)}: {m.group(0)}"
        for p in root.rglob("*.py")
        if p not in allowed and "_pb2" not in p.name
        for m in pattern.finditer(p.read_text())
    ]
    assert not offenders, offenders
