"""Helpers the test modules share (instead of importing each other)."""

from __future__ import annotations

import json
import shutil

from safetensors.torch import load_file, save_file

from offsite.artefacts.adapter import ADAPTER_MANIFEST, WEIGHTS_NAME
from offsite.atomic import sha256_file


def expect_error(capsys, fn, argv, message, absent=None):
    capsys.readouterr()
    assert fn(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err, err
    assert "Traceback" not in err
    if absent is not None:
        assert not absent.exists(), f"{absent} was left behind"
        assert not list(absent.parent.glob(f".{absent.name}.*")), "temporary output left behind"


def copy_tree(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_adapter(path, mutate):
    """Tamper with adapter weights, then fix up the manifest so only the deep checks can catch it."""
    tensors = load_file(str(path / WEIGHTS_NAME))
    mutate(tensors)
    save_file(tensors, str(path / WEIGHTS_NAME))
    manifest = json.loads((path / ADAPTER_MANIFEST).read_text())
    manifest["files"][WEIGHTS_NAME] = sha256_file(path / WEIGHTS_NAME)
    manifest["tensors"] = {
        k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
        for k, v in tensors.items()
    }
    (path / ADAPTER_MANIFEST).write_text(json.dumps(manifest))
