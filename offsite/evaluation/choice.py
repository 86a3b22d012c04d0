"""Multiple-choice and verbalizer scoring with lm-evaluation-harness as the engine.

Every option is scored by the log-likelihood of its tokens after the prompt, as lm-eval does:
``acc`` picks the option with the highest total log-likelihood, ``acc_norm`` the highest per
byte of option text. Our own items (from a task spec) become an lm-eval task built from a config
dict with the items as its data set, so nothing is written to disk and no hub is needed; any
registered lm-eval task can be run by name too.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from offsite.errors import OffsiteError
from offsite.evaluation.specs import ChoiceItem
from offsite.models.modes import eval_mode
from offsite.training.data import adds_bos


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs a warning per metric and per model object; keep our output readable."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _kept_random_state() -> Iterator[None]:
    import numpy as np

    states = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():  # torch's generators, CUDA's included
            yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])


def _lm(model: nn.Module, tokenizer, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    class _Scored(HFLM):
        def _model_call(self, inps, attn_mask=None, labels=None):
            # a PEFT soft prompt puts its positions first: score only the input's own
            return super()._model_call(inps, attn_mask, labels)[:, -inps.shape[1] :]

    device = str(next(model.parameters()).device)
    # BOS exactly when the training data has it (offsite.training.data follows the tokenizer)
    return _Scored(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
                   add_bos_token=adds_bos(tokenizer))  # fmt: skip


@functools.cache
def task_manager():
    """lm-eval's task index, built once per process (indexing every task takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(verbosity="ERROR")


def _run(model: nn.Module, tokenizer, task, batch_size: int, limit: int | None) -> dict:
    import lm_eval

    with (
        eval_mode(model),
        _quiet_lm_eval(),
        _kept_random_state(),
    ):  # simple_evaluate reseeds every generator
        out = lm_eval.simple_evaluate(
            model=_lm(model, tokenizer, batch_size),
            tasks=[task],
            task_manager=task_manager(),
            limit=limit,
            bootstrap_iters=0,
            log_samples=True,
            verbosity="ERROR",
        )
    return out


def _metrics(result: dict, name: str) -> dict:
    res = result["results"][name]
    metrics = {k.split(",")[0]: v for k, v in res.items() if "," in k and "stderr" not in k}
    return {**metrics, "n": len(result["samples"][name])}


def score_choices(
    model: nn.Module,
    tokenizer,
    items: list[ChoiceItem],
    *,
    delimiter: str = " ",
    batch_size: int = 16,
    name: str = "offsite_choice",
) -> dict:
    """Accuracy of `model` on `items`: {"acc", "acc_norm", "n"}."""
    from datasets import Dataset, DatasetDict

    if not items:
        raise OffsiteError(f"task {name}: no items to score")
    docs = [{"prompt": it.prompt, "choices": list(it.choices), "gold": it.gold} for it in items]
    config = {
        "task": name,
        "custom_dataset": lambda **_: DatasetDict({"test": Dataset.from_list(docs)}),
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": lambda d: d["prompt"],
        "doc_to_choice": lambda d: d["choices"],
        "doc_to_target": lambda d: d["gold"],
        "target_delimiter": delimiter,
        "metric_list": [
            {"metric": m, "aggregation": "mean", "higher_is_better": True}
            for m in ("acc", "acc_norm")
        ],
    }
    return _metrics(_run(model, tokenizer, config, batch_size, None), name)


def score_named(
    model: nn.Module, tokenizer, task: str, *, batch_size: int = 16, limit: int | None = None
) -> dict:
    """Any registered lm-eval task by name (it fetches its own data, usually from the hub)."""
    try:
        result = _run(model, tokenizer, task, batch_size, limit)
    except (KeyError, ValueError) as e:
        raise OffsiteError(f"lm-eval task {task!r}: {e}") from None
    except (OSError, ConnectionError) as e:
        raise OffsiteError(_no_data(task, e)) from None
    return _metrics(result, task)


def _no_data(task: str, e: Exception) -> str:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return f"lm-eval task {task!r}: its data could not be loaded ({first}); it needs the Hugging Face hub or its data in the local cache"  # fmt: skip


def named_training_items(task: str, limit: int | None = None) -> tuple[list[ChoiceItem], str]:
    """Training items of a registered multiple-choice lm-eval task, and its target delimiter."""
    from lm_eval.tasks import get_task_dict

    with _quiet_lm_eval():
        try:
            obj = get_task_dict([task], task_manager())[task]
        except (KeyError, ValueError) as e:
            raise OffsiteError(f"lm-eval task {task!r}: {e}") from None
        except (OSError, ConnectionError) as e:
            raise OffsiteError(_no_data(task, e)) from None
    if obj.OUTPUT_TYPE != "multiple_choice":
        raise OffsiteError(f"lm-eval task {task!r} is {obj.OUTPUT_TYPE}; fine-tuning here supports multiple_choice tasks")  # fmt: skip
    docs = obj.training_docs() if obj.has_training_docs() else None
    if docs is None:
        raise OffsiteError(f"lm-eval task {task!r} has no training split to fine-tune on")
    items = []
    for n, doc in enumerate(docs):
        if limit is not None and n >= limit:
            break
        target = obj.doc_to_target(doc)
        choices = tuple(obj.doc_to_choice(doc))
        gold = target if isinstance(target, int) else choices.index(target)
        items.append(ChoiceItem(obj.doc_to_text(doc), choices, gold))
    return items, obj.config.target_delimiter
