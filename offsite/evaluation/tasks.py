"""A task ready to run: its training data and how a model is scored on it.

`build_task` turns a task spec (offsite.evaluation.specs) into one of three runnable tasks with the same
small interface -- `train_data(tokenizer)` and `score(model, tokenizer)` -- which is all the
five-setting evaluation needs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from torch import nn

from offsite.errors import OffsiteError
from offsite.evaluation.choice import named_training_items, score_choices, score_named
from offsite.evaluation.perplexity import perplexity
from offsite.evaluation.specs import ChoiceItem, TaskSpec, choice_items, completion_pairs, records
from offsite.training.data import TokenData, pad_id_of, pairs_data, read_text, text_data


class Task(Protocol):
    name: str
    metric: str  # "perplexity" or "accuracy"
    higher_is_better: bool

    def train_data(self, tokenizer) -> TokenData: ...

    def score(self, model: nn.Module, tokenizer) -> dict: ...


def _first(data: TokenData, n: int | None) -> TokenData:
    return data if not n else TokenData(data.examples[:n], data.source, data.sha256, data.mode)


@dataclass(frozen=True)
class PerplexityTask:
    """Language modelling: packed text to train on, held-out text to score (lower is better)."""

    name: str
    train_text: str
    test_text: str
    block_size: int = 128
    eval_sequences: int | None = None
    metric: str = "perplexity"
    higher_is_better: bool = False

    @classmethod
    def from_files(cls, train: Path, test: Path, block_size: int = 128, eval_sequences: int | None = None) -> PerplexityTask:  # fmt: skip
        name = Path(train).stem.removesuffix("-train").removesuffix("_train")  # e.g. "shakespeare"
        return cls(name, read_text(Path(train)), read_text(Path(test)), block_size, eval_sequences)

    def train_data(self, tokenizer) -> TokenData:
        return text_data(self.train_text, tokenizer, self.block_size, f"{self.name} (train)")

    def heldout(self, tokenizer) -> TokenData:
        data = text_data(self.test_text, tokenizer, self.block_size, f"{self.name} (test)")
        return _first(data, self.eval_sequences)

    def score(self, model: nn.Module, tokenizer) -> dict:
        r = perplexity(model, self.heldout(tokenizer), pad_id=pad_id_of(tokenizer))
        return {"value": r["perplexity"], "n": r["tokens"], "unit": "tokens"}


def _choice_train_data(task: ChoiceTask | LMEvalTask, tokenizer) -> TokenData:
    """Prompt -> right option pairs (the loss on the option), for both kinds of choice task."""
    pairs = completion_pairs(list(task.train_items), task.delimiter)
    return pairs_data(pairs, tokenizer, task.block_size, f"{task.name} (train)")


@dataclass(frozen=True)
class ChoiceTask:
    """Multiple choice or verbalizer classification: fine-tune on prompt -> right option."""

    name: str
    train_items: tuple[ChoiceItem, ...]
    test_items: tuple[ChoiceItem, ...]
    delimiter: str = " "
    block_size: int = 256
    batch_size: int = 16
    metric: str = "accuracy"
    higher_is_better: bool = True

    def train_data(self, tokenizer) -> TokenData:
        return _choice_train_data(self, tokenizer)

    def score(self, model: nn.Module, tokenizer) -> dict:
        r = score_choices(model, tokenizer, list(self.test_items), delimiter=self.delimiter,
                          batch_size=self.batch_size, name=self.name)  # fmt: skip
        return {"value": r["acc"], "acc_norm": r["acc_norm"], "n": r["n"], "unit": "items"}


@dataclass(frozen=True)
class LMEvalTask:
    """A registered lm-eval multiple-choice task by name; trains on its training split."""

    name: str
    train_items: tuple[ChoiceItem, ...]
    delimiter: str
    limit: int | None = None
    block_size: int = 256
    batch_size: int = 16
    metric: str = "accuracy"
    higher_is_better: bool = True

    def train_data(self, tokenizer) -> TokenData:
        return _choice_train_data(self, tokenizer)

    def score(self, model: nn.Module, tokenizer) -> dict:
        r = score_named(model, tokenizer, self.name, batch_size=self.batch_size, limit=self.limit)
        return {"value": r["acc"], **{k: v for k, v in r.items() if k != "acc"}, "unit": "items"}


def _limit(items: list, n: int | None, seed: int) -> tuple:
    """At most `n` items, a seeded sample kept in file order (files are often sorted by label)."""
    if not n or n >= len(items):
        return tuple(items)
    return tuple(items[i] for i in sorted(random.Random(seed).sample(range(len(items)), n)))


def build_task(spec: TaskSpec, data_root: Path, *, block_size: int | None = None, eval_limit: int | None = None,
               train_limit: int | None = None, seed: int = 0) -> Task:  # fmt: skip
    """A runnable task from a spec. `eval_limit`: test items (choice) or held-out blocks (LM)."""
    if spec.kind == "lm_eval":
        items, delim = named_training_items(spec.lm_eval_task or spec.name, train_limit)
        return LMEvalTask(spec.lm_eval_task or spec.name, tuple(items), delim, eval_limit)
    train, test = records(spec, data_root, seed)
    if spec.kind == "perplexity":
        return PerplexityTask(
            spec.name, train[0]["text"], test[0]["text"], block_size or 128, eval_limit
        )
    return ChoiceTask(spec.name, _limit(choice_items(spec, train), train_limit, seed), _limit(choice_items(spec, test), eval_limit, seed),
                      spec.target_delimiter, block_size or 256)  # fmt: skip


def load_task_files(train: Path, test: Path, block_size: int, eval_sequences: int | None) -> Task:
    """An ad-hoc task from two files: text (perplexity) or .jsonl prompt/completion."""
    if Path(train).suffix.lower() == ".txt" and Path(test).suffix.lower() == ".txt":
        return PerplexityTask.from_files(train, test, block_size, eval_sequences)
    raise OffsiteError(f"{train}, {test}: `train_file`/`test_file` take .txt files; describe other tasks with a spec (`tasks`)")  # fmt: skip
