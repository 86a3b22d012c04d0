"""Training and evaluation data: .txt packed into blocks, or .jsonl of text, prompt/completion or
chat messages (offsite.training.chat)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from offsite.errors import OffsiteError
from offsite.training.chat import IGNORE_INDEX, chat_examples


@dataclass(frozen=True)
class Example:
    """One training sequence; `labels` is IGNORE_INDEX where no loss is taken."""

    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class TokenData:
    """Tokenised examples plus where they came from."""

    examples: list[Example]
    source: str
    sha256: str
    mode: str  # "packed", "prompt_completion" or "chat"

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def read_text(path: Path) -> str:
    """A UTF-8 text file, or a one-line error naming it (missing, not UTF-8, empty)."""
    if not path.is_file():
        raise OffsiteError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise OffsiteError(
            f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8"
        ) from None
    if not text.strip():
        raise OffsiteError(f"{path}: data file is empty")
    return text


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts every text with BOS (Llama-3, Gemma do): then the model was
    trained so, and every packed block and every prompt must start with it too."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True, return_attention_mask=False, verbose=False)[
        "input_ids"
    ]
    return bool(ids) and ids[0] == bos


def _bos(tokenizer) -> int | None:
    return tokenizer.bos_token_id if adds_bos(tokenizer) else None


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)[
        "input_ids"
    ]


def _pack(
    path: Path | str, ids: list[int], block_size: int, bos: int | None = None
) -> list[Example]:
    """Cut `ids` into blocks of `block_size`; with `bos`, each block is BOS + block_size-1 tokens
    (no loss on the BOS itself)."""
    width = block_size - (bos is not None)
    n = len(ids) // width
    if n == 0:
        raise OffsiteError(
            f"{path}: only {len(ids)} tokens, shorter than one block of {block_size}; "
            "add data or use a smaller `block_size`"
        )
    head, label = ([bos], [IGNORE_INDEX]) if bos is not None else ([], [])
    return [
        Example(head + ids[i * width : (i + 1) * width], label + ids[i * width : (i + 1) * width])
        for i in range(n)
    ]


def _parse_jsonl(path: Path, text: str) -> list[tuple[int, dict]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise OffsiteError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise OffsiteError(f'{path}:{lineno}: expected a JSON object like {{"text": ...}}')
        rows.append((lineno, obj))
    return rows


def _row_kind(path: Path, lineno: int, obj: dict) -> str:
    if "messages" in obj:
        return "chat"
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
        return "prompt_completion"
    if isinstance(obj.get("text"), str):
        return "text"
    raise OffsiteError(
        f"{path}:{lineno}: needs a string 'text', string 'prompt' and 'completion', or a 'messages' list"
    )


def _prompt_completion(
    path: Path | str, pairs: list[tuple[str, str]], tokenizer, block_size: int
) -> list[Example]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    out = []
    for prompt_text, completion_text in pairs:
        prompt = bos + _encode(tokenizer, prompt_text)
        completion = _encode(tokenizer, completion_text) + eos
        ids = (prompt + completion)[:block_size]
        labels = ([IGNORE_INDEX] * len(prompt) + completion)[:block_size]
        if any(label != IGNORE_INDEX for label in labels):
            out.append(Example(ids, labels))
    if not out:
        raise OffsiteError(
            f"{path}: every completion is cut off by `block_size` {block_size}; raise it"
        )
    return out


def load_data(path: str | Path, tokenizer, block_size: int) -> TokenData:
    """Tokenise a .txt or .jsonl file into training examples of at most `block_size` tokens."""
    path = Path(path)
    if block_size < 2:
        raise OffsiteError(f"`block_size` {block_size} is too small; use at least 2")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise OffsiteError(
            f"{path}: unsupported data file type {suffix or '(none)'}; use .txt or .jsonl"
        )
    text = read_text(path)
    digest = hashlib.sha256(text.encode()).hexdigest()
    if suffix == ".txt":
        return TokenData(
            _pack(path, _encode(tokenizer, text), block_size, _bos(tokenizer)),
            str(path),
            digest,
            "packed",
        )
    rows = _parse_jsonl(path, text)
    if not rows:
        raise OffsiteError(f"{path}: data file is empty")
    kinds = {_row_kind(path, lineno, obj) for lineno, obj in rows}
    if len(kinds) > 1:
        first = next(
            lineno
            for lineno, obj in rows
            if _row_kind(path, lineno, obj) != _row_kind(path, *rows[0])
        )
        raise OffsiteError(
            f"{path}:{first}: mixes kinds of rows ('text', 'prompt'/'completion', 'messages'); use one kind per file"
        )
    if kinds == {"chat"}:
        pairs = chat_examples(path, rows, tokenizer, block_size)
        return TokenData([Example(i, lab) for i, lab in pairs], str(path), digest, "chat")
    if kinds == {"prompt_completion"}:
        return TokenData(
            _prompt_completion(
                path, [(o["prompt"], o["completion"]) for _, o in rows], tokenizer, block_size
            ),
            str(path),
            digest,
            "prompt_completion",
        )
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = [t for _, obj in rows for t in _encode(tokenizer, obj["text"]) + eos]
    return TokenData(_pack(path, ids, block_size, _bos(tokenizer)), str(path), digest, "packed")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def text_data(text: str, tokenizer, block_size: int, source: str) -> TokenData:
    """Text held in memory (e.g. one part of a split file), packed into blocks."""
    return TokenData(_pack(source, _encode(tokenizer, text), block_size, _bos(tokenizer)), source, _digest(text), "packed")  # fmt: skip


def pairs_data(pairs: list[tuple[str, str]], tokenizer, block_size: int, source: str) -> TokenData:
    """Prompt/completion pairs held in memory; the loss is on the completion (and EOS) only."""
    if not pairs:
        raise OffsiteError(f"{source}: no training examples")
    digest = _digest("\n".join(json.dumps(p) for p in pairs))
    return TokenData(_prompt_completion(source, pairs, tokenizer, block_size), source, digest, "prompt_completion")  # fmt: skip


def split_validation(
    data: TokenData, fraction: float, seed: int
) -> tuple[TokenData, TokenData | None]:
    """Hold out floor(len*fraction) examples, chosen by `seed`; None when that is zero."""
    if not 0.0 <= fraction < 1.0:
        raise OffsiteError(f"`val_fraction` {fraction} must be in [0, 1)")
    n_val = int(len(data) * fraction)
    if n_val == 0:
        return data, None
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])

    def pick(ix: list[int]) -> TokenData:
        return TokenData([data.examples[i] for i in ix], data.source, data.sha256, data.mode)

    return pick(train), pick(val)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into a batch (input_ids, attention_mask, labels)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_id_of(tokenizer) -> int:
    """The id used to pad inputs (padding is masked out of attention and loss anyway)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0
