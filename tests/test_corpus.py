"""Sampling a public corpus from the owner's own model."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import save_tiny, tiny_model

from offsite.emulator.corpus import SampleConfig, document_start, sample_corpus, write_corpus
from offsite.errors import OffsiteError
from offsite.training.data import load_data
from owner.cli import main as owner


def test_sampling_is_seeded_and_leaves_the_random_state_alone(tokenizer):
    model = tiny_model("llama")
    cfg = SampleConfig(documents=5, tokens=12, batch_size=2, seed=3)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    docs = sample_corpus(model, tokenizer, cfg)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert 1 <= len(docs) <= 5 and all(d.strip() == d and d for d in docs)
    assert sample_corpus(model, tokenizer, cfg) == docs
    assert sample_corpus(model, tokenizer, SampleConfig(documents=5, tokens=12, seed=4)) != docs


def test_documents_start_where_the_tokenizer_starts_them(tokenizer):
    # the tiny tokenizer prepends no BOS, so documents start after EOS as in GPT-style corpora
    assert tokenizer("a")["input_ids"][0] != tokenizer.bos_token_id
    assert document_start(tokenizer) == tokenizer.eos_token_id


@pytest.mark.parametrize(
    "field, value",
    [("documents", 0), ("tokens", 0), ("temperature", 0.0), ("top_k", -1), ("top_p", 1.5)],
)
def test_bad_sampling_options(field, value):
    with pytest.raises(OffsiteError, match=f"`{field}`"):
        SampleConfig(**{field: value})


def test_cli_writes_a_corpus_distillation_can_read(tmp_path, tokenizer, capsys):
    model_dir = save_tiny("gpt2", tmp_path / "model")
    out = tmp_path / "corpus.txt"
    args = ["sample-corpus", "--model", str(model_dir), "--out", str(out), "--documents", "4",
            "--tokens", "40", "--batch-size", "3"]  # fmt: skip
    assert owner(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["corpus"] == str(out) and report["documents"] >= 1
    text = out.read_text()
    assert text.endswith("\n") and len(text.split("\n\n")) == report["documents"]
    assert len(load_data(out, tokenizer, 16)) >= 1

    out.write_text("keep me")
    assert owner(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    assert owner([*args[:4], str(tmp_path / "missing" / "c.txt"), *args[5:]]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "a-dir").mkdir()
    assert owner([*args[:4], str(tmp_path / "a-dir"), *args[5:], "--overwrite"]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert owner([*args[:4], str(tmp_path), *args[5:], "--overwrite"]) == 2  # it holds the model
    assert "overlaps --model" in capsys.readouterr().err


def test_an_empty_sample_is_an_error(tmp_path):
    with pytest.raises(OffsiteError, match="no text was sampled"):
        write_corpus(tmp_path / "c.txt", [])
    assert not (tmp_path / "c.txt").exists()
