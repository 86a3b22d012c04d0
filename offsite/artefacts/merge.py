"""`owner merge-adapter`: verify a returned adapter against its bundle and plug it into the full model.

The key set comes from the *bundle's* adapter blocks (what the owner issued), never from the
adapter's own claim, and the data owner's signature is checked with a key the owner trusts.
The merged model is a plain Hugging Face directory, with `offsite_merge.json` recording what
was verified, written atomically with it.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedModel

from offsite.artefacts.adapter import (
    ADAPTER_MANIFEST,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    WEIGHTS_NAME,
    Adapter,
    expected_spec,
    only_trained,
    open_adapter,
    plug_adapter,
)
from offsite.artefacts.bundle import Bundle, open_bundle
from offsite.artefacts.peft_delta import merge_delta, merged_blocks, verify_delta
from offsite.artefacts.peft_methods import method_of
from offsite.artefacts.shards import (
    NotStreamable,
    block_parameter_names,
    copy_with,
    is_sharded_dir,
    state_names,
    stream_fingerprint,
    tensor_map,
)
from offsite.artefacts.tensorcheck import CheckedTensors, check_spec, load_checked
from offsite.atomic import atomic_directory, check_apart, check_free_space, check_output_dir
from offsite.errors import OffsiteError, VerificationError
from offsite.models.architectures import block_prefix
from offsite.models.fingerprint import model_fingerprint
from offsite.models.loading import (
    DEFAULT_MODEL,
    load_model,
    load_tokenizer,
    local_path,
    resolve_model,
)

log = logging.getLogger(__name__)

MERGE_RECORD = "offsite_merge.json"
MERGE_RECORD_VERSION = 1
PROMPT_DIR = "prompt"
_KEY_SETS = {
    "blocks": "exactly the bundle's adapter blocks, shapes and dtypes of this model",
    "peft": "exactly what the manifest's PEFT options give on the bundle's adapter blocks; "
    "adapter_config.json agrees with them",
}


def verify_adapter(
    adapter: Adapter, bundle: Bundle, full_model: PreTrainedModel, fingerprint: str
) -> dict[str, torch.Tensor]:
    """Check a block adapter against the bundle it names and the full model; load its tensors.

    Bundle id, base fingerprint (of the bundle and the adapter), block prefix, the exact key set
    of the bundle's adapter blocks, shapes, dtypes and finite values.
    """
    check_origin(adapter, bundle, full_model.config.model_type, fingerprint)
    expected = only_trained(expected_spec(full_model, bundle.adapter_sources), adapter.trained)
    check_spec(str(adapter.path / ADAPTER_MANIFEST), adapter.spec, expected)
    return load_checked(adapter.path / WEIGHTS_NAME, expected)


def check_origin(adapter: Adapter, bundle: Bundle, model_type: str, fingerprint: str) -> None:
    """The adapter was trained from this bundle, and both were made for this very model."""
    m, where = adapter.manifest, adapter.path
    if m["bundle_id"] != bundle.bundle_id:
        raise VerificationError(
            f"{where}: adapter was trained from bundle {m['bundle_id'][:19]}…, not {bundle.bundle_id[:19]}… ({bundle.path})"
        )
    for name, value in (("bundle", bundle.base_fingerprint), ("adapter", m["base_fingerprint"])):
        if value != fingerprint:
            raise VerificationError(
                f"{where}: the {name} was made for base model {value[:19]}…, not this one "
                f"({fingerprint[:19]}…); merge it into the model its bundle was made from, loaded in the "
                "same dtype (`dtype`)"
            )
    if m["block_prefix"] != block_prefix(model_type):
        raise VerificationError(
            f"{where}: block_prefix {m['block_prefix']!r} does not match this model"
        )
    if m["adapter_blocks"] != bundle.adapter_sources:
        raise VerificationError(
            f"{where}: adapter claims blocks {m['adapter_blocks']}, but the bundle's adapter blocks are "
            f"{bundle.adapter_sources}"
        )


@dataclass(frozen=True)
class MergeSpec:
    """Which adapter to merge into which model, and how its signature is checked.

    `signer_key`: the data owner's Ed25519 public key (from the owner home's registry or a file);
    without one, `allow_unsigned` must be set and the record says the signature was not checked.
    """

    adapter: Path
    bundle: Path
    out: Path
    model: str = DEFAULT_MODEL
    signer_key: object | None = None
    allow_unsigned: bool = False
    dtype: torch.dtype | None = None
    overwrite: bool = False
    signer: str | None = (
        None  # the enrolled identity whose key `signer_key` is (the registry's word)
    )
    signer_revoked_at: str | None = None  # set when that identity is revoked and merged anyway

    def __post_init__(self) -> None:
        if self.signer_key is None and not self.allow_unsigned:
            raise OffsiteError(
                f"{self.adapter}: no key to check the adapter's signature with; pass `home` (the "
                "registry knows each data owner's key) or `signer_key` FILE, or `allow_unsigned`"
            )


def merge(spec: MergeSpec) -> dict:
    """Verify the adapter (signature, bundle, key set, values), plug it in, write the merged model.

    A safetensors source kept in its own dtype is merged by streaming: its shards are copied and
    only the adapter blocks' bytes replaced (memory: the adapter blocks); otherwise it is loaded."""
    check_output_dir(spec.out, spec.overwrite)
    model_dir = spec.model if Path(spec.model).exists() else None
    check_apart(
        {"`out`": spec.out},
        {"`adapter`": spec.adapter, "`bundle`": spec.bundle, "`model`": model_dir},
    )
    # the bundle's manifest is all a merge reads of it: the emulator's weights are not hashed
    adapter, bundle = open_adapter(spec.adapter), open_bundle(spec.bundle, weights=False)
    signature = "not checked (allow_unsigned)"
    if spec.signer_key is not None:
        signer = adapter.verify_signature(spec.signer_key)
        signature = f"verified: signed by {signer!r} with the key the owner holds for it"
    resolved = resolve_model(spec.model)
    source = Path(local_path(resolved))
    size = (
        sum(f.stat().st_size for f in source.rglob("*") if f.is_file())
        if source.is_dir()
        else source.stat().st_size
    )
    check_free_space(spec.out, size, "the merged model")
    # a GGUF source is converted to bfloat16 (load_model), which needs it loaded
    if spec.dtype is None and resolved.gguf_file is None and is_sharded_dir(source):
        try:
            return _merge_streaming(spec, adapter, bundle, source, signature)
        except NotStreamable as e:
            log.info("merging in memory: %s", e)
    return _merge_loaded(spec, adapter, bundle, signature)


def _merge_streaming(spec: MergeSpec, adapter: Adapter, bundle: Bundle, source: Path, signature: str) -> dict:  # fmt: skip
    # NotStreamable now, before any work, if the files name tensors otherwise than the model
    names = state_names(source)
    model_type = AutoConfig.from_pretrained(source).model_type
    check_origin(adapter, bundle, model_type, bundle.base_fingerprint)  # ids and blocks, at once
    with ThreadPoolExecutor(1) as pool:  # the model's fingerprint is hashed while the files copy
        hashing = pool.submit(stream_fingerprint, source, names)
        return _write_streaming(spec, adapter, bundle, source, signature, hashing, model_type)


def _write_streaming(spec: MergeSpec, adapter: Adapter, bundle: Bundle, source: Path, signature: str,
                     hashing: Future, model_type: str) -> dict:  # fmt: skip
    replacements: Mapping[str, torch.Tensor] = {}
    if adapter.kind == "peft":
        options, delta = verify_delta(adapter, bundle)
        if method_of(options.method).in_weights:
            replacements = merged_blocks(source, bundle, options, delta)
    else:
        stored = tensor_map(source)
        names = block_parameter_names(source, bundle.adapter_sources)
        expected = only_trained(
            {n: (stored[n].dtype, stored[n].shape) for n in names}, adapter.trained
        )
        check_spec(str(adapter.path / ADAPTER_MANIFEST), adapter.spec, expected)
        replacements = CheckedTensors(adapter.weights, expected)  # read one at a time
    with atomic_directory(spec.out, overwrite=spec.overwrite) as tmp:
        copy_with(source, tmp, replacements)
        fingerprint = hashing.result()
        check_origin(adapter, bundle, model_type, fingerprint)  # else the copy is removed
        record = _record(adapter, bundle, spec, fingerprint, signature)
        record["written"] = (
            "streaming: the source's files copied, only the adapter blocks' bytes replaced"
        )
        _finish(tmp, adapter, record)
    return {"merged": str(spec.out), **record}


def _merge_loaded(spec: MergeSpec, adapter: Adapter, bundle: Bundle, signature: str) -> dict:
    model = load_model(spec.model, dtype=spec.dtype)
    fingerprint = model_fingerprint(model)
    if adapter.kind == "peft":
        check_origin(adapter, bundle, model.config.model_type, fingerprint)
        options, delta = verify_delta(adapter, bundle)
        if method_of(options.method).in_weights:
            model = merge_delta(model, options, bundle, delta)
    else:
        plug_adapter(model, verify_adapter(adapter, bundle, model, fingerprint))
    record = _record(adapter, bundle, spec, fingerprint, signature)
    record["written"] = "loaded: the model in memory, saved with save_pretrained"
    with atomic_directory(spec.out, overwrite=spec.overwrite) as tmp:
        model.save_pretrained(tmp)
        load_tokenizer(spec.model).save_pretrained(tmp)
        _finish(tmp, adapter, record)
    return {"merged": str(spec.out), **record}


def _record(adapter: Adapter, bundle: Bundle, spec: MergeSpec, fingerprint: str, signature: str) -> dict:  # fmt: skip
    record = {
        "format_version": MERGE_RECORD_VERSION,
        "base_fingerprint": fingerprint,
        "bundle_id": bundle.bundle_id,
        "adapter_blocks": bundle.adapter_sources,
        "adapter": str(adapter.path),
        # the identity whose key verified the signature (not the manifest's own claim)
        "signer": (spec.signer or adapter.manifest.get("signer"))
        if spec.signer_key is not None
        else None,
        "verified": {
            "signature": signature,
            "hashes": "every adapter and bundle file matches its manifest",
            "key_set": _KEY_SETS[adapter.kind],
            "values": "finite",
            "base_model": "bundle and adapter were made for this model's fingerprint",
        },
    }
    if adapter.kind == "peft":
        record["peft"] = adapter.manifest["peft"]
        if not method_of(adapter.manifest["peft"]["method"]).in_weights:  # verified: a method
            record["prompt"] = (
                f"{PROMPT_DIR}/: the soft prompt; PeftModel.from_pretrained(model, 'OUT/{PROMPT_DIR}')"
            )
    if spec.signer_revoked_at:
        record["signer_revoked_at"] = spec.signer_revoked_at
        record["verified"]["signer_standing"] = "revoked; merged knowingly (allow_revoked)"
    if adapter.trained != "all":
        record["trained"] = adapter.trained
    dp = (adapter.manifest.get("training") or {}).get("differential_privacy")
    if dp:  # the guarantee the data owner signed that it trained under
        record["differential_privacy"] = dp
    return record


def _finish(tmp: Path, adapter: Adapter, record: dict) -> None:
    """The soft prompt beside the (unchanged) model, and the merge record."""
    if "prompt" in record:  # a prompt is not weights: it travels beside the model
        (tmp / PROMPT_DIR).mkdir()
        for name in (PEFT_CONFIG, PEFT_WEIGHTS):
            shutil.copy2(adapter.path / name, tmp / PROMPT_DIR / name)
    (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
