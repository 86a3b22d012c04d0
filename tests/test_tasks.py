"""Task specs as data, their readers, and choice scoring through lm-eval on tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SHARED_DATA
from tiny import DEPTH, tiny_model

from offsite.emulator.build import build_emulator
from offsite.emulator.plan import make_plan
from offsite.errors import OffsiteError
from offsite.evaluation.choice import score_choices
from offsite.evaluation.five_settings import (
    derived,
    evaluate_offsite,
    five_settings_table,
    write_results,
)
from offsite.evaluation.specs import (
    ChoiceItem,
    builtin_tasks,
    choice_items,
    load_task,
    parse_spec,
    records,
)
from offsite.evaluation.tasks import ChoiceTask, build_task
from offsite.training.config import TrainConfig


def _spec(tmp_path, text: str, name: str = "t.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return load_task(str(path))


def test_verbalizer_spec_reads_label_sentence_files(tmp_path):
    (tmp_path / "train.txt").write_text("1 a fine film\n0 a dull film\n")
    (tmp_path / "test.txt").write_text("0 boring\n")
    spec = _spec(tmp_path, "version: 1\nkind: choice\ntrain: {file: train.txt, format: label_sentence}\n"
                 "test: {file: test.txt, format: label_sentence}\nprompt: '{sentence} It was'\n"
                 "verbalizer: {'0': terrible, '1': great}\n")  # fmt: skip
    train, test = records(spec, tmp_path)
    items = choice_items(spec, train)
    assert items[0] == ChoiceItem("a fine film It was", ("terrible", "great"), 1)
    assert choice_items(spec, test) == [ChoiceItem("boring It was", ("terrible", "great"), 0)]


def test_multiple_choice_reader_csv_and_holdout(tmp_path):
    item = {"instruction": "Please choose the correct answer to the question: Which is red?\n\n"
            "Answer1: the sky Answer2: a tomato Answer3: grass\n\nAnswer format: answer1/answer2/answer3",
            "answer": "answer2"}  # fmt: skip
    (tmp_path / "mc.json").write_text(json.dumps([item]))
    spec = _spec(tmp_path, "version: 1\nkind: choice\ntrain: {file: mc.json, format: llm_adapters}\n"
                 "test: {file: mc.json, format: llm_adapters}\nprompt: \"Q: {question}\\nA:\"\n"
                 "choices_field: choices\nlabel_field: gold\n")  # fmt: skip
    assert choice_items(spec, records(spec, tmp_path)[1]) == [
        ChoiceItem("Q: Which is red?\nA:", ("the sky", "a tomato", "grass"), 1)
    ]
    rows = "".join(f'{1 + i % 2},"title {i}","text, {i}"\n' for i in range(20))
    (tmp_path / "news.csv").write_text("Class,Title,Description\n" + rows)
    spec = _spec(tmp_path, "version: 1\nkind: choice\ntrain: {file: news.csv, format: csv, header: true, "
                 "columns: [label, title, description]}\nholdout: 0.25\nprompt: '{title}: {description}'\n"
                 "verbalizer: {'1': World, '2': Sports}\n", "n.yaml")  # fmt: skip
    train, test = records(spec, tmp_path, seed=3)
    assert len(train) == 15 and len(test) == 5 and not {r["title"] for r in train} & {r["title"] for r in test}  # fmt: skip
    assert records(spec, tmp_path, seed=3) == (train, test), "the split is seeded"
    assert test[0]["description"].startswith("text, ")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("kind: choice\ntrain: a.txt\nverbalizer: {a: b}\nprompts: x\n", "unknown field 'prompts'"),
        ("kind: regression\ntrain: a.txt\n", "'kind' must be one of"),
        ("kind: choice\ntrain: a.txt\n", "needs 'verbalizer' or 'choices_field'"),
        (
            "kind: choice\ntrain: {file: a.txt, format: xml}\nverbalizer: {a: b}\n",
            "unknown format 'xml'",
        ),
        ("version: 7\nkind: perplexity\ntrain: a.txt\n", "spec version 7"),
        ("kind: [unclosed\n", "not valid YAML"),
        ("kind: choice\ntrain: a.txt\nverbalizer: [a, b]\n", "'verbalizer' maps each label"),
        ("kind: perplexity\ntrain: a.txt\nholdout: lots\n", "'holdout' must be a number"),
        ("kind: choice\ntrain: a.txt\nchoices_field: [x]\n", "'choices_field' must be a string"),
    ],
)
def test_bad_specs_name_the_file_and_field(tmp_path, body, message):
    with pytest.raises(OffsiteError, match=message) as e:
        _spec(tmp_path, body)
    assert "t.yaml" in str(e.value)


def test_missing_data_and_labels_are_clear(tmp_path):
    spec = _spec(tmp_path, "kind: choice\ntrain: {file: gone.txt, format: label_sentence}\nprompt: '{sentence}'\nverbalizer: {'0': no}\n")  # fmt: skip
    with pytest.raises(OffsiteError, match="gone.txt not found; pass `data_root`"):
        records(spec, tmp_path)
    (tmp_path / "gone.txt").write_text("")
    with pytest.raises(OffsiteError, match="gone.txt: data file is empty"):
        records(spec, tmp_path)
    (tmp_path / "gone.txt").write_text("0 zero\n3 three\n0 again\n")
    with pytest.raises(OffsiteError, match="label '3', not in the verbalizer"):
        choice_items(spec, records(spec, tmp_path)[0] + records(spec, tmp_path)[1])
    mc = parse_spec({"kind": "choice", "train": "x", "choices_field": "options", "label_field": "answer"}, "mc.yaml")  # fmt: skip
    with pytest.raises(OffsiteError, match="mc.yaml: record 0 needs a list 'options' and an index 'answer'"):  # fmt: skip
        choice_items(mc, [{"text": "q", "options": ["a", "b"], "answer": 2}])
    with pytest.raises(OffsiteError, match="not a spec file, a built-in task"):
        load_task("no-such-task")


def test_builtin_specs_parse():
    assert {"sst2", "agnews", "trec", "rte", "cb", "arc-easy", "arc-challenge", "openbookqa"} <= set(builtin_tasks())  # fmt: skip
    for name in builtin_tasks():
        assert load_task(name).name == name


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data (the real data sets)")
@pytest.mark.parametrize("name", ["sst2", "agnews", "trec", "rte", "cb", "arc-easy", "arc-challenge", "openbookqa"])  # fmt: skip
def test_builtin_specs_read_the_real_data(name):
    spec = load_task(name)
    train, test = records(spec, SHARED_DATA)
    items = choice_items(spec, test)
    assert len(choice_items(spec, train)) > 100 and len(items) > 50
    assert all(0 <= it.gold < len(it.choices) and all(it.choices) for it in items)


def _loglik(model, tok, prompt: str, option: str) -> float:
    """log p(" option" | prompt), encoded as lm-eval encodes a context/continuation pair."""
    ctx = tok(prompt, add_special_tokens=False)["input_ids"]
    whole = tok(prompt + " " + option, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def test_choice_scoring_matches_hand_computed_log_likelihoods(tokenizer):
    model = tiny_model("llama")
    prompts = ["the cat sat on the", "a dog ran to", "we went home and"]
    options = ("mat", "green house", "big red door")
    best, worst = [], []
    for p in prompts:
        ll = [_loglik(model, tokenizer, p, o) for o in options]
        best.append(ChoiceItem(p, options, max(range(3), key=ll.__getitem__)))
        worst.append(ChoiceItem(p, options, min(range(3), key=ll.__getitem__)))
        norm = [v / len(o) for v, o in zip(ll, options, strict=True)]  # lm-eval: per character
        best_norm = max(range(3), key=norm.__getitem__)
    scored = score_choices(model, tokenizer, best)
    assert scored["acc"] == 1.0 and scored["n"] == 3
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    assert score_choices(model, tokenizer, worst)["acc"] == 0.0
    assert torch.equal(torch.rand(3), expected), "scoring leaves the caller's random state alone"
    last = ChoiceItem(prompts[-1], options, best_norm)
    assert score_choices(model, tokenizer, [last])["acc_norm"] == 1.0


def test_five_settings_on_a_choice_task(tokenizer, tmp_path):
    full = tiny_model("llama")
    plan = make_plan(DEPTH, emulator_layers=2)
    items = tuple(ChoiceItem(f"item {i} is", ("red", "blue"), i % 2) for i in range(12))
    task = ChoiceTask("toy", items, items[:6], block_size=16)
    r = evaluate_offsite(full, tokenizer, plan, build_emulator(full, plan), task,
                         TrainConfig(max_steps=3, batch_size=4, learning_rate=5e-3))  # fmt: skip
    for key in ("full_zero_shot", "emulator_zero_shot", "emulator_finetuned", "plug_in", "full_finetuned"):  # fmt: skip
        assert 0.0 <= r[key] <= 1.0 and r["details"][key]["n"] == 6
    assert r["metric"] == "accuracy" and r["higher_is_better"]
    assert math.isclose(r["privacy_margin"], r["plug_in"] - r["emulator_finetuned"])
    assert "| plug-in (full model + adapter) |" in five_settings_table(r)
    write_results([r], tmp_path)
    assert (tmp_path / "toy" / "result.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "summary.json").read_text())[0]["task"] == "toy"
    assert "| toy | accuracy |" in (tmp_path / "summary.md").read_text()


def test_derived_figures_for_accuracy_by_hand():
    r = {"full_zero_shot": 0.50, "plug_in": 0.65, "full_finetuned": 0.70, "emulator_finetuned": 0.55,
         "higher_is_better": True}  # fmt: skip
    d = derived(r)
    assert d["gap_closed"] == pytest.approx(0.75) and d["privacy_margin"] == pytest.approx(0.10)


def test_build_task_limits_are_seeded_samples(tmp_path):
    (tmp_path / "d.txt").write_text("".join(f"{i % 2} sentence {i}\n" for i in range(40)))
    spec = parse_spec({"kind": "choice", "train": {"file": "d.txt", "format": "label_sentence"},
                       "test": {"file": "d.txt", "format": "label_sentence"}, "prompt": "{sentence}",
                       "verbalizer": {"0": "no", "1": "yes"}}, "inline")  # fmt: skip
    a = build_task(spec, tmp_path, eval_limit=10, train_limit=20, seed=1)
    b = build_task(spec, tmp_path, eval_limit=10, train_limit=20, seed=1)
    assert a == b and len(a.test_items) == 10 and len(a.train_items) == 20
    assert a.test_items != tuple(choice_items(spec, records(spec, tmp_path)[1])[:10])


def test_named_lm_eval_tasks_fail_clearly_without_their_data(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    from offsite.evaluation.choice import named_training_items

    # an empty cache, whatever this machine has downloaded before: the data cannot be found
    for module, attr in (
        (datasets.config, "HF_DATASETS_CACHE"),
        (huggingface_hub.constants, "HF_HUB_CACHE"),
    ):
        monkeypatch.setattr(module, attr, str(tmp_path / attr))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)

    with pytest.raises(OffsiteError, match="not a registered task"):
        named_training_items("no_such_task_xyz")
    with pytest.raises(
        OffsiteError, match="needs the Hugging Face hub"
    ):  # conftest sets HF_HUB_OFFLINE
        named_training_items("arc_easy")
    assert load_task("lm-eval:arc_easy").lm_eval_task == "arc_easy"


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_five_settings_with_peft_on_a_choice_task(method, tokenizer):
    from offsite.artefacts.peft_delta import PeftOptions

    full = tiny_model("llama")
    plan = make_plan(DEPTH, emulator_layers=2)
    items = tuple(ChoiceItem(f"item {i} is", ("red", "blue"), i % 2) for i in range(12))
    task = ChoiceTask("toy", items, items[:6], block_size=16)
    r = evaluate_offsite(full, tokenizer, plan, build_emulator(full, plan), task,
                         TrainConfig(max_steps=3, batch_size=4, learning_rate=5e-2),
                         full_finetune=False, peft=PeftOptions(method, rank=2, virtual_tokens=2))  # fmt: skip
    assert (
        r["peft"]["method"] == method and 0 < r["trainable_parameters"] < full.num_parameters() / 10
    )
    assert (
        r["adapter_bytes"] == 4 * r["trainable_parameters"] and r["adapter_tokens_per_second"] > 0
    )
    assert r["plug_in"] != r["full_zero_shot"] or r["emulator_finetuned"] != r["emulator_zero_shot"]
