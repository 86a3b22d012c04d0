"""Tiny random models of every registered family and a small offline tokenizer (tests, benchmarks, smoke runs)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 320
DEPTH = 8

FAMILIES = [
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
    "phi3", "opt", "gpt2", "gpt_neox", "bloom", "falcon", "gptj",
]  # fmt: skip

_COMMON = dict(
    hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
    vocab_size=VOCAB, max_position_embeddings=256, head_dim=8, pad_token_id=0,
    bos_token_id=1, eos_token_id=2,
)  # fmt: skip
_FAMILY = {
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
    "gptj": dict(rotary_dim=4, n_positions=256),
    "gpt2": dict(n_positions=256, n_inner=64),
    "gemma2": dict(sliding_window=16),
    "gemma3_text": dict(sliding_window=16),
    "falcon": dict(new_decoder_architecture=False, multi_query=True),
}

CORPUS = (
    "the quick brown fox jumps over the lazy dog. a stitch in time saves nine. "
    "to be or not to be, that is the question. all that glitters is not gold. "
) * 20


def tiny_config(family: str, depth: int = DEPTH):
    """A small config of `family` with `depth` blocks."""
    cfg = AutoConfig.for_model(family)
    for key, value in {**_COMMON, **_FAMILY.get(family, {})}.items():
        with contextlib.suppress(AttributeError, TypeError):
            setattr(cfg, key, value)
    cfg.num_hidden_layers = depth
    if getattr(cfg, "layer_types", None) is not None:
        pattern = (
            ["sliding_attention", "full_attention"] if "gemma" in family else ["full_attention"]
        )
        cfg.layer_types = [pattern[i % len(pattern)] for i in range(depth)]
    cfg.tie_word_embeddings = family in (
        "gemma",
        "gemma2",
        "gemma3_text",
        "opt",
        "gpt2",
        "bloom",
        "falcon",
    )
    return cfg


def tiny_model(family: str, depth: int = DEPTH, seed: int = 0):
    """A randomly initialised tiny causal LM in eval mode (float32)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, depth))
    with torch.no_grad():  # random norms and biases: every block matters and no two are equal
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with VOCAB entries, trained offline on a short text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def save_tiny(family: str, path: Path, depth: int = DEPTH, seed: int = 0) -> Path:
    """Write a tiny model + tokenizer as a Hugging Face directory."""
    tiny_model(family, depth, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
