"""Evaluation tasks as data: a small YAML spec per task, read into training data and test items.

Three kinds of task:

* ``perplexity`` -- language modelling: train on text, report held-out perplexity;
* ``choice`` -- multiple choice or prompt + verbalizer classification: each item is a prompt,
  its options and the index of the right one; the model is fine-tuned on prompt/completion pairs
  (the right option as the completion) and scored by the log-likelihood of each option;
* ``lm_eval`` -- any task of lm-evaluation-harness by name (needs its data, usually the hub).

A spec names its files relative to a data root (``--data-root``, default ``$OFFSITE_DATA`` or
``../shared/data``), a reader for their format, and for choice tasks a prompt template over the
reader's fields plus either a verbalizer (label -> word) or a field holding each item's options.
Built-in specs live in ``offsite/task_specs/``; a user's own spec is a path to a ``.yaml`` file.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from offsite.errors import OffsiteError
from offsite.training.data import read_text

SPEC_VERSION = 1
BUILTIN_DIR = Path(__file__).parent / "task_specs"
KINDS = ("perplexity", "choice", "lm_eval")


@dataclass(frozen=True)
class FileRef:
    """One data file of a task, with the reader for its format and an optional row range."""

    file: str
    format: str = "text"
    columns: tuple[str, ...] = ()  # csv: field names, in order
    header: bool = False  # csv: skip the first row


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    train: FileRef | None = None
    test: FileRef | None = None
    holdout: float = 0.1  # test share of `train` when the spec has no test file
    prompt: str = "{text}"
    label_field: str = "label"
    verbalizer: dict[str, str] = field(default_factory=dict)  # label -> option text, in order
    choices_field: str | None = None  # per-item options (multiple choice)
    target_delimiter: str = " "  # between the prompt and an option
    lm_eval_task: str | None = None
    description: str = ""
    source: str = ""  # the spec file it came from


@dataclass(frozen=True)
class ChoiceItem:
    """A prompt, its options, and the index of the right option."""

    prompt: str
    choices: tuple[str, ...]
    gold: int


# -- readers: file -> list of records (dicts of fields) ----------------------------------------


def _label_sentence(path: Path, ref: FileRef) -> list[dict]:
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            label, _, sentence = line.strip().partition(" ")
            if not sentence:
                raise OffsiteError(f"{path}:{n}: expected 'LABEL SENTENCE'")
            rows.append({"label": label, "sentence": sentence})
    return rows


def _trec(path: Path, ref: FileRef) -> list[dict]:
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            tag, _, question = line.strip().partition(" ")
            coarse, sep, fine = tag.partition(":")
            if not sep or not question:
                raise OffsiteError(f"{path}:{n}: expected 'COARSE:fine QUESTION'")
            rows.append({"label": coarse, "fine": fine, "question": question})
    return rows


def _csv(path: Path, ref: FileRef) -> list[dict]:
    if not ref.columns:
        raise OffsiteError(f"{path}: a csv file in a task spec needs 'columns'")
    reader = csv.reader(read_text(path).splitlines())
    rows = list(reader)[1 if ref.header else 0 :]
    for n, row in enumerate(rows, start=2 if ref.header else 1):
        if len(row) != len(ref.columns):
            raise OffsiteError(f"{path}:{n}: {len(row)} columns, the spec names {len(ref.columns)}")
    return [{k: v.strip() for k, v in zip(ref.columns, row, strict=True)} for row in rows]


def _jsonl(path: Path, ref: FileRef) -> list[dict]:
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise OffsiteError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


_OPTION = re.compile(r"Answer(\d+):\s*(.*?)(?=\s*Answer\d+:|$)", re.S)


def _llm_adapters(path: Path, ref: FileRef) -> list[dict]:
    """LLM-Adapters multiple choice: question and `Answer1: ... AnswerN: ...` in `instruction`."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise OffsiteError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    rows = []
    for n, obj in enumerate(data):
        body = obj.get("instruction", "").split("\n\nAnswer format:")[0]
        head, _, options = body.partition("\n\n")
        question = head.split("question:", 1)[-1].strip()
        found = _OPTION.findall(options)
        answer = str(obj.get("answer", ""))
        if not found or not answer.startswith("answer"):
            raise OffsiteError(f"{path}: item {n} has no 'AnswerN:' options or no 'answerN' answer")
        numbers = [int(k) for k, _ in found]
        gold = int(answer[len("answer") :])
        if numbers != list(range(1, len(found) + 1)) or not 1 <= gold <= len(found):
            raise OffsiteError(f"{path}: item {n}: options or answer out of order ({answer})")
        rows.append(
            {"question": question, "choices": [t.strip() for _, t in found], "gold": gold - 1}
        )
    return rows


def _text(path: Path, ref: FileRef) -> list[dict]:
    return [{"text": read_text(path)}]


READERS: dict[str, Callable[[Path, FileRef], list[dict]]] = {
    "text": _text,
    "label_sentence": _label_sentence,
    "trec": _trec,
    "csv": _csv,
    "jsonl": _jsonl,
    "llm_adapters": _llm_adapters,
}


# -- specs ----------------------------------------------------------------------------------------


def builtin_tasks() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def _file_ref(raw, where: str) -> FileRef | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"file": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("file"), str):
        raise OffsiteError(f"{where}: needs 'file: PATH' (and optionally 'format')")
    fmt = raw.get("format", "text")
    if fmt not in READERS:
        raise OffsiteError(f"{where}: unknown format {fmt!r}; use one of {', '.join(READERS)}")
    return FileRef(raw["file"], fmt, tuple(raw.get("columns", ())), bool(raw.get("header", False)))


def parse_spec(raw: dict, source: str) -> TaskSpec:
    """Check a spec's fields and build it; errors name the spec file and the field."""
    if not isinstance(raw, dict):
        raise OffsiteError(f"{source}: a task spec is a YAML mapping")
    if raw.get("version", SPEC_VERSION) != SPEC_VERSION:
        raise OffsiteError(
            f"{source}: spec version {raw.get('version')!r}; this tool reads {SPEC_VERSION}"
        )
    known = {"version", "name", "kind", "train", "test", "holdout", "prompt", "label_field", "verbalizer",
             "choices_field", "target_delimiter", "lm_eval_task", "description"}  # fmt: skip
    unknown = sorted(set(raw) - known)
    if unknown:
        raise OffsiteError(
            f"{source}: unknown field {unknown[0]!r}; fields are {', '.join(sorted(known))}"
        )
    if not isinstance(raw.get("verbalizer") or {}, dict):
        raise OffsiteError(f"{source}: 'verbalizer' maps each label to its word, e.g. {{'0': terrible, '1': great}}")  # fmt: skip
    if not isinstance(raw.get("holdout", 0.1), int | float):
        raise OffsiteError(f"{source}: 'holdout' must be a number between 0 and 1")
    for key in ("prompt", "choices_field", "lm_eval_task", "label_field"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise OffsiteError(f"{source}: {key!r} must be a string")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise OffsiteError(f"{source}: 'kind' must be one of {', '.join(KINDS)}, not {kind!r}")
    spec = TaskSpec(
        name=str(raw.get("name") or Path(source).stem),
        kind=kind,
        train=_file_ref(raw.get("train"), f"{source}: 'train'"),
        test=_file_ref(raw.get("test"), f"{source}: 'test'"),
        holdout=float(raw.get("holdout", 0.1)),
        prompt=str(raw.get("prompt", "{text}")),
        label_field=str(raw.get("label_field", "label")),
        verbalizer={str(k): str(v) for k, v in (raw.get("verbalizer") or {}).items()},
        choices_field=raw.get("choices_field"),
        target_delimiter=str(raw.get("target_delimiter", " ")),
        lm_eval_task=raw.get("lm_eval_task"),
        description=str(raw.get("description", "")),
        source=source,
    )
    if kind == "lm_eval" and not spec.lm_eval_task:
        raise OffsiteError(f"{source}: kind lm_eval needs 'lm_eval_task: NAME'")
    if kind != "lm_eval" and spec.train is None:
        raise OffsiteError(f"{source}: needs a 'train' file")
    if kind == "choice" and not spec.verbalizer and not spec.choices_field:
        raise OffsiteError(f"{source}: a choice task needs 'verbalizer' or 'choices_field'")
    if not 0.0 < spec.holdout < 1.0:
        raise OffsiteError(f"{source}: 'holdout' must be between 0 and 1")
    return spec


def load_task(name_or_path: str) -> TaskSpec:
    """A built-in task by name, ``lm-eval:NAME`` for any lm-eval task, or a path to a spec file."""
    if name_or_path.startswith("lm-eval:"):
        name = name_or_path.split(":", 1)[1]
        return TaskSpec(name=name, kind="lm_eval", lm_eval_task=name, source=name_or_path)
    path = Path(name_or_path)
    if not path.suffix and (BUILTIN_DIR / f"{name_or_path}.yaml").is_file():
        path = BUILTIN_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise OffsiteError(f"task {name_or_path!r}: not a spec file, a built-in task ({', '.join(builtin_tasks())}) or lm-eval:NAME")  # fmt: skip
    try:
        raw = yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        raise OffsiteError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_spec(raw, str(path))


def data_root(given: str | None = None) -> Path:
    """Where task specs' data files live: `given` (--data-root), else $OFFSITE_DATA, else ../shared/data."""
    return Path(given or os.environ.get("OFFSITE_DATA", "../shared/data"))


def resolve(ref: FileRef, data_root: Path, spec: TaskSpec) -> Path:
    """The file a spec names: absolute as given, relative to the data root otherwise."""
    path = Path(ref.file) if Path(ref.file).is_absolute() else data_root / ref.file
    if not path.is_file():
        raise OffsiteError(f"{spec.source}: data file {path} not found; pass `data_root` DIR (the folder holding {ref.file})")  # fmt: skip
    return path


def _read(spec: TaskSpec, ref: FileRef, data_root: Path) -> list[dict]:
    path = resolve(ref, data_root, spec)
    rows = READERS[ref.format](path, ref)
    if not rows:  # e.g. a csv with only its header
        raise OffsiteError(f"{path}: no records")
    return rows


def _split(rows: list, holdout: float, seed: int) -> tuple[list, list]:
    if len(rows) < 2:
        raise OffsiteError(
            f"{len(rows)} record(s): too few to hold out a test share; add a 'test' file"
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_test = max(1, int(len(rows) * holdout))
    test = sorted(order[:n_test])
    return [rows[i] for i in sorted(order[n_test:])], [rows[i] for i in test]


def records(spec: TaskSpec, data_root: Path, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Training and test records; with no test file, a seeded `holdout` share of the training file.

    Text (one record) is split by characters: the first 1 - holdout for training, the rest for test.
    """
    assert spec.train is not None
    train = _read(spec, spec.train, data_root)
    if spec.test is not None:
        return train, _read(spec, spec.test, data_root)
    if spec.train.format == "text":
        text = train[0]["text"]
        cut = int(len(text) * (1 - spec.holdout))
        return [{"text": text[:cut]}], [{"text": text[cut:]}]
    return _split(train, spec.holdout, seed)


def choice_items(spec: TaskSpec, rows: list[dict]) -> list[ChoiceItem]:
    """Prompt, options and answer for every record of a choice task."""
    labels = list(spec.verbalizer)
    items = []
    for n, row in enumerate(rows):
        try:
            prompt = spec.prompt.format(**row)
        except KeyError as e:
            raise OffsiteError(f"{spec.source}: 'prompt' uses field {e} that the records lack (they have {', '.join(row)})") from None  # fmt: skip
        if spec.choices_field:
            options, gold = row.get(spec.choices_field), row.get(spec.label_field)
            if (
                not isinstance(options, list)
                or not isinstance(gold, int)
                or not 0 <= gold < len(options)
            ):
                raise OffsiteError(f"{spec.source}: record {n} needs a list {spec.choices_field!r} and an index {spec.label_field!r} into it")  # fmt: skip
            choices = tuple(str(o) for o in options)
        else:
            label = str(row.get(spec.label_field))
            if label not in spec.verbalizer:
                raise OffsiteError(f"{spec.source}: record {n} has label {label!r}, not in the verbalizer ({', '.join(labels)})")  # fmt: skip
            choices, gold = tuple(spec.verbalizer.values()), labels.index(label)
        items.append(ChoiceItem(prompt, choices, gold))
    return items


def completion_pairs(items: list[ChoiceItem], delimiter: str = " ") -> list[tuple[str, str]]:
    """Prompt/completion pairs for fine-tuning: the right option is the completion."""
    return [(it.prompt, delimiter + it.choices[it.gold]) for it in items]
