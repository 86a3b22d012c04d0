import json

import pytest

from offsite.errors import OffsiteError
from offsite.training.data import IGNORE_INDEX, collate, load_data, split_validation


def test_text_is_packed_into_full_blocks(tokenizer, corpus_file):
    data = load_data(corpus_file, tokenizer, 32)
    n_tokens = len(tokenizer(corpus_file.read_text())["input_ids"])
    assert len(data) == n_tokens // 32 and data.mode == "packed"
    assert all(len(e.input_ids) == 32 and e.labels == e.input_ids for e in data.examples)


def test_jsonl_text_rows_are_joined_with_eos(tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "\n".join(json.dumps({"text": "to be or not to be"}) for _ in range(20)) + "\n\n"
    )
    data = load_data(path, tokenizer, 16)
    assert data.mode == "packed" and tokenizer.eos_token_id in data.examples[0].input_ids


def test_prompt_completion_takes_loss_on_the_completion_only(tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "the quick brown fox", "completion": " jumps"}) + "\n")
    (ex,) = load_data(path, tokenizer, 64).examples
    n_prompt = len(tokenizer("the quick brown fox")["input_ids"])
    assert ex.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert (
        ex.labels[n_prompt:] == ex.input_ids[n_prompt:] and ex.labels[-1] == tokenizer.eos_token_id
    )
    batch = collate([ex, ex.__class__(ex.input_ids[:3], [IGNORE_INDEX] * 3)], pad_id=0)
    assert batch["attention_mask"][1].tolist() == [1, 1, 1] + [0] * (len(ex.input_ids) - 3)
    assert (batch["labels"][1] == IGNORE_INDEX).all()


def test_validation_split_is_seeded_and_disjoint(tokenizer, corpus_file):
    data = load_data(corpus_file, tokenizer, 8)
    train, val = split_validation(data, 0.25, seed=3)
    again, val2 = split_validation(data, 0.25, seed=3)
    assert len(val) == int(len(data) * 0.25) and len(train) + len(val) == len(data)
    assert val.examples == val2.examples
    assert split_validation(data, 0.0, 0)[1] is None


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "  \n", "empty.txt: data file is empty"),
        ("short.txt", "to be", "shorter than one block of 512"),
        ("bad.jsonl", '{"text": "a"}\n{"text": oops}\n', "bad.jsonl:2: not valid JSON"),
        ("list.jsonl", '{"text": "a"}\n\n[1, 2]\n', "list.jsonl:3: expected a JSON object"),
        ("keys.jsonl", '{"prompt": "a"}\n', "keys.jsonl:1: needs a string 'text'"),
        (
            "mixed.jsonl",
            '{"text": "a"}\n{"prompt": "a", "completion": "b"}\n',
            "mixed.jsonl:2: mixes",
        ),
        ("data.csv", "a,b\n", "unsupported data file type .csv"),
        ("empty.jsonl", "\n\n", "empty.jsonl: data file is empty"),
    ],
)
def test_bad_data_files_get_clear_errors(tokenizer, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(OffsiteError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_data(path, tokenizer, 512)


def test_missing_and_binary_data_files(tokenizer, tmp_path):
    with pytest.raises(OffsiteError, match="data file not found"):
        load_data(tmp_path / "nope.txt", tokenizer, 8)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(OffsiteError, match="not UTF-8"):
        load_data(tmp_path / "bin.txt", tokenizer, 8)


def _bos_tokenizer():
    from tiny import tiny_tokenizer
    from tokenizers import processors

    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    return tok


def test_bos_per_block_when_the_tokenizer_adds_bos(tmp_path, tokenizer):
    from offsite.training.data import IGNORE_INDEX, adds_bos, load_data, pairs_data, text_data

    bos_tok = _bos_tokenizer()
    assert adds_bos(bos_tok) and not adds_bos(tokenizer)
    (tmp_path / "c.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    for data in (
        load_data(tmp_path / "c.txt", bos_tok, 16),
        text_data("a stitch in time " * 30, bos_tok, 16, "t"),
    ):
        assert all(
            e.input_ids[0] == bos_tok.bos_token_id and e.labels[0] == IGNORE_INDEX
            for e in data.examples
        )
        assert all(
            len(e.input_ids) == 16 and bos_tok.bos_token_id not in e.input_ids[1:]
            for e in data.examples
        )
    pairs = pairs_data([("to be or", " not")], bos_tok, 16, "p")
    assert pairs.examples[0].input_ids[0] == bos_tok.bos_token_id
    plain = load_data(tmp_path / "c.txt", tokenizer, 16)
    assert all(e.input_ids[0] != tokenizer.bos_token_id for e in plain.examples)


def test_choice_scoring_follows_the_bos_convention():
    from tiny import tiny_model

    from offsite.evaluation.choice import _lm, score_choices
    from offsite.evaluation.specs import ChoiceItem

    bos_tok = _bos_tokenizer()
    model = tiny_model("llama")
    assert _lm(model, bos_tok, 4).add_bos_token is True
    items = [ChoiceItem("to be or", ("not", "fox"), 0), ChoiceItem("the lazy", ("dog", "time"), 0)]
    assert score_choices(model, bos_tok, items)["n"] == 2
