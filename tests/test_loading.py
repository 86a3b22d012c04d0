"""Model loading: --model resolution errors, and loads from several threads at once."""

import threading

import pytest
from tiny import save_tiny

from offsite.errors import OffsiteError
from offsite.models.loading import load_model, resolve_model


def test_concurrent_loads_leave_later_models_whole(tmp_path):
    # transformers 5.23 patches global state inside from_pretrained: eight loads at once used to
    # leave the next tied-weights model with lm_head on the meta device.
    save_tiny("llama", tmp_path / "llama")
    save_tiny("gemma", tmp_path / "gemma")
    errors, loaded = [], []

    def load() -> None:
        try:
            model = load_model(str(tmp_path / "llama"))
            loaded.append(not [n for n, t in model.state_dict().items() if t.device.type == "meta"])
        except Exception as e:  # reported below: a thread's exception is otherwise lost
            errors.append(repr(e))

    threads = [threading.Thread(target=load) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and loaded == [True] * 8, errors
    model = load_model(str(tmp_path / "gemma"))
    assert not [n for n, t in model.state_dict().items() if t.device.type == "meta"]


def test_model_spec_errors(tmp_path):
    with pytest.raises(OffsiteError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "x.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(OffsiteError, match="has no config.json"):
        resolve_model(str(tmp_path / "empty"))
    assert resolve_model("org/name").path == "org/name"
