"""Chat data (`{"messages": [...]}` lines): the tokenizer's template, loss on assistant turns only."""

from __future__ import annotations

import json
import re

import pytest
from helpers import expect_error
from tiny import DEPTH, tiny_model, tiny_tokenizer

from data_owner.cli import main as data_owner
from offsite.emulator.package import package_emulator
from offsite.emulator.plan import make_plan
from offsite.errors import OffsiteError
from offsite.training.data import IGNORE_INDEX, load_data

# ChatML, as SmolLM2-Instruct and Qwen write it (without their default system prompt)
CHATML = (
    "{% for m in messages %}{{ '<s>' + m['role'] + '\\n' + m['content'] + '</s>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)
TALK = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the king"},
                  {"role": "assistant", "content": "is dead"}]},
    {"messages": [{"role": "user", "content": "to be"}, {"role": "assistant", "content": "or not"},
                  {"role": "user", "content": "that is"}, {"role": "assistant", "content": "the question"}]},
]  # fmt: skip


@pytest.fixture
def chat_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = CHATML
    return tok


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _answers(tok, example) -> str:
    return tok.decode(
        [
            t
            for t, label in zip(example.input_ids, example.labels, strict=True)
            if label != IGNORE_INDEX
        ]
    )


def test_the_loss_is_on_the_assistant_turns_only(chat_tokenizer, tmp_path):
    data = load_data(_write(tmp_path / "c.jsonl", TALK), chat_tokenizer, 256)
    assert data.mode == "chat" and len(data) == 2
    assert _answers(chat_tokenizer, data.examples[0]) == "is dead</s>\n"
    assert _answers(chat_tokenizer, data.examples[1]) == "or not</s>\nthe question</s>\n"
    whole = chat_tokenizer.apply_chat_template(TALK[1]["messages"], tokenize=False)
    assert chat_tokenizer.decode(data.examples[1].input_ids) == whole  # the template's own text


def test_a_conversation_cut_by_the_block_keeps_what_fits(chat_tokenizer, tmp_path):
    n = len(
        load_data(_write(tmp_path / "c.jsonl", TALK[1:]), chat_tokenizer, 256).examples[0].input_ids
    )
    cut = load_data(tmp_path / "c.jsonl", chat_tokenizer, n - 3).examples[0]
    assert len(cut.input_ids) == n - 3 and _answers(chat_tokenizer, cut).startswith(
        "or not</s>\nthe"
    )
    with pytest.raises(OffsiteError, match="cut off by `block_size` 3"):
        load_data(_write(tmp_path / "d.jsonl", TALK[:1]), chat_tokenizer, 3)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": "hi"}, ":2: 'messages' must be a non-empty list"),
        ({"messages": [{"role": "king", "content": "x"}]}, ":2: messages[0] needs a 'role'"),
        ({"messages": [{"role": "user", "content": 3}]}, ":2: messages[0] needs a 'role'"),
        ({"messages": [{"role": "user", "content": "no answer"}]}, ":2: no assistant message"),
        ({"text": "plain"}, ":2: mixes kinds of rows"),
    ],
)
def test_a_malformed_line_names_its_number(chat_tokenizer, tmp_path, row, message):
    with pytest.raises(OffsiteError, match=re.escape(message)):
        load_data(_write(tmp_path / "c.jsonl", [TALK[0], row]), chat_tokenizer, 64)


def test_a_tokenizer_without_a_template_is_a_one_line_error_naming_the_file(tmp_path, capsys):
    package_emulator(
        tiny_model("llama"),
        tiny_tokenizer(),
        make_plan(DEPTH, emulator_layers=2),
        tmp_path / "b",
        base_name="t",
    )
    data = _write(tmp_path / "chat.jsonl", TALK)
    expect_error(capsys, data_owner, ["finetune", "--bundle", str(tmp_path / "b"), "--data", str(data), "--out",
                                      str(tmp_path / "a"), "--max-steps", "1"], f"{data}: chat rows", tmp_path / "a")  # fmt: skip


def test_finetune_trains_on_chat_data(chat_tokenizer, tmp_path, capsys):
    package_emulator(
        tiny_model("llama"),
        chat_tokenizer,
        make_plan(DEPTH, emulator_layers=2),
        tmp_path / "b",
        base_name="t",
    )
    data = _write(tmp_path / "chat.jsonl", TALK * 4)
    assert data_owner(["finetune", "--bundle", str(tmp_path / "b"), "--data", str(data), "--out", str(tmp_path / "a"),
                       "--max-steps", "2", "--batch-size", "2", "--val-fraction", "0"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 2 and out["final_loss"] > 0
