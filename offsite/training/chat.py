"""Chat data: `.jsonl` lines of `{"messages": [{"role": ..., "content": ...}, ...]}` (the
convention of TRL and the OpenAI fine-tuning API), rendered with the tokenizer's own chat
template; the loss is taken on the assistant turns only.

Each conversation is cut at its assistant turns: the template renders the messages before turn
i with the generation prompt (what the model sees before it answers) and the messages up to and
including turn i; the difference is the answer, which is the only text with labels. A template
must render a conversation's beginning as a prefix of the whole (every common template does);
one that does not is refused rather than trained on misaligned labels.
"""

from __future__ import annotations

from pathlib import Path

from offsite.errors import OffsiteError

IGNORE_INDEX = -100  # as offsite.training.data's: no loss on this position
ROLES = ("system", "user", "assistant", "tool")


def check_messages(path: Path, lineno: int, obj: dict) -> list[dict]:
    """The line's messages, each a role from ROLES and string content, with an assistant turn."""
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OffsiteError(f"{path}:{lineno}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or m.get("role") not in ROLES
            or not isinstance(m.get("content"), str)
        ):
            raise OffsiteError(f"{path}:{lineno}: messages[{i}] needs a 'role' ({', '.join(ROLES)}) "
                               "and a string 'content'")  # fmt: skip
    if not any(m["role"] == "assistant" for m in messages):
        raise OffsiteError(f"{path}:{lineno}: no assistant message: nothing to learn from")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _render(tokenizer, messages: list[dict], prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    except Exception as e:  # jinja's TemplateError (e.g. "roles must alternate") and friends
        raise OffsiteError(
            f"{where}: the tokenizer's chat template refuses it ({str(e).splitlines()[0]})"
        ) from None


def segments(tokenizer, messages: list[dict], where: str) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_answer) pieces, in order."""
    out, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = (
            _render(tokenizer, messages[:i], True, where)
            if i
            else _render(tokenizer, [], True, where)
        )
        upto = _render(tokenizer, messages[: i + 1], False, where)
        if not before.startswith(done) or not upto.startswith(before):
            raise OffsiteError(f"{where}: the chat template does not render the conversation's start as a "
                               "prefix of the whole; use prompt/completion rows for this model")  # fmt: skip
        out += [(before[len(done) :], False), (upto[len(before) :], True)]
        done = upto
    return out


def chat_examples(
    path: Path, rows: list[tuple[int, dict]], tokenizer, block_size: int
) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per conversation, cut at `block_size` tokens; labels on the answers only."""
    if not getattr(tokenizer, "chat_template", None):
        raise OffsiteError(f"{path}: chat rows ('messages') need a tokenizer with a chat template, and this "
                           "model's has none; write prompt/completion rows instead")  # fmt: skip
    out = []
    for lineno, obj in rows:
        ids, labels = [], []
        for text, answer in segments(
            tokenizer, check_messages(path, lineno, obj), f"{path}:{lineno}"
        ):
            piece = tokenizer(
                text, add_special_tokens=False, return_attention_mask=False, verbose=False
            )["input_ids"]
            ids += piece
            labels += piece if answer else [IGNORE_INDEX] * len(piece)
        ids, labels = ids[:block_size], labels[:block_size]
        if any(label != IGNORE_INDEX for label in labels):
            out.append((ids, labels))
    if not out:
        raise OffsiteError(
            f"{path}: every assistant turn is cut off by `block_size` {block_size}; raise it"
        )
    return out
