"""Benchmark: packaging and merging a big model tensor by tensor (peak memory, throughput).

    python -m scripts.bench_packaging [--layers 28 --hidden 2048 --intermediate 5632] [--work DIR]

Writes a synthetic LLaMA-style model (random bf16 weights, ~1.6B parameters by default, sharded
safetensors; made here, no network), then, each in its own process: a plain copy of the model's
files (the throughput reference), `package --stream` of a half-depth emulator, and the streaming
merge of an adapter (the bundle's own adapter blocks, perturbed) back into the model, and
`package --stream` with the default recipe (redundancy selection and layer-wise fitting, block by
block; `--fit-steps`, `--fit-sequences`). Prints one
JSON line: peak RSS of each step against the model's size on disk, throughput against the copy,
dtypes, and whether the merged tensors are byte-identical to the source's outside the adapter.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from scripts.memory import peak_rss_mib


def make_model(root: Path, args: argparse.Namespace) -> int:
    """A random bf16 LLaMA-style model in `root`, shard by shard; returns its bytes on disk."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from offsite.models.tiny import tiny_tokenizer

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 128, num_key_value_heads=args.hidden // 128,
                         vocab_size=32000, tie_word_embeddings=False, dtype="bfloat16")  # fmt: skip
    config.save_pretrained(root)
    tiny_tokenizer().save_pretrained(root)
    h, m = args.hidden, args.intermediate
    block = {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (h, h), "self_attn.v_proj.weight": (h, h),
             "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (m, h), "mlp.up_proj.weight": (m, h),
             "mlp.down_proj.weight": (h, m), "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,)}  # fmt: skip
    groups = [{"model.embed_tokens.weight": (32000, h)}]
    groups += [{f"model.layers.{i}.{k}": s for k, s in block.items()} for i in range(args.layers)]
    groups += [{"model.norm.weight": (h,), "lm_head.weight": (32000, h)}]
    per_shard = 4
    shards = [groups[i : i + per_shard] for i in range(0, len(groups), per_shard)]
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {
            k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16)
            for g in shard
            for k, s in g.items()
        }
        save_file(tensors, str(root / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * 2 for t in tensors.values())
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


def _step(name: str, work: str, queue) -> None:
    import offsite.artefacts.merge  # noqa: F401  (imports outside the timed part, as in a CLI)
    import offsite.emulator.package  # noqa: F401

    base = peak_rss_mib()
    w = Path(work)
    t = time.perf_counter()
    if name == "copy":
        shutil.copytree(w / "model", w / "copy")
    elif name.startswith("package"):
        from offsite.emulator.layerwise import LayerwiseConfig
        from offsite.emulator.package import PackageSpec, package
        from offsite.emulator.recipe import EmulatorRecipe

        recipe = EmulatorRecipe(selection="uniform", layerwise=None)
        out = w / "bundle"
        if name != "package":  # "package:STEPS:SEQUENCES": the default recipe, block by block
            steps, sequences = map(int, name.split(":")[1:])
            recipe, out = (
                EmulatorRecipe(layerwise=LayerwiseConfig(steps=steps, max_sequences=sequences)),
                w / "fitted",
            )
        layers = json.loads((w / "model" / "config.json").read_text())["num_hidden_layers"]
        package(PackageSpec(out=out, model=str(w / "model"), emulator_layers=(layers - 4) // 2,
                            recipe=recipe, stream=True))  # fmt: skip
    else:
        from offsite.artefacts.merge import MergeSpec, merge

        merge(
            MergeSpec(
                w / "adapter",
                w / "bundle",
                w / "merged",
                model=str(w / "model"),
                allow_unsigned=True,
            )
        )
    queue.put(
        {
            "seconds": time.perf_counter() - t,
            "peak_rss_mib": peak_rss_mib(),
            "baseline_rss_mib": base,
        }
    )


def make_adapter(work: Path) -> None:
    """The bundle's adapter blocks, perturbed, saved as the data owner would (one tensor at a time)."""
    from offsite.artefacts.adapter import save_adapter, spec_from_bundle
    from offsite.artefacts.bundle import open_bundle
    from offsite.artefacts.shards import load_tensor, tensor_map

    bundle = open_bundle(work / "bundle")
    stored = tensor_map(bundle.path)
    position = dict(zip(bundle.adapter_sources, bundle.adapter_positions, strict=True))
    prefix = bundle.manifest["base_model"]["block_prefix"]
    state = {}
    for name in spec_from_bundle(bundle):  # full-model names; the bundle stores them renumbered
        i, rest = name.removeprefix(prefix + ".").split(".", 1)
        state[name] = load_tensor(stored[f"{prefix}.{position[int(i)]}.{rest}"]) + 1e-3
    save_adapter(state, bundle, work / "adapter", training={})


def _run(name: str, work: Path) -> dict:
    # every step starts with what the steps before wrote on disk, not still being written back
    # (else a step is slowed by its predecessors' writeback: the merge varied 2.3-6.6 s)
    os.sync()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_step, args=(name, str(work), queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def check_merged(work: Path) -> dict:
    """Dtypes, and byte identity outside the adapter blocks."""
    from offsite.artefacts.bundle import open_bundle
    from offsite.artefacts.shards import read_bytes, tensor_map

    adapter_blocks = set(open_bundle(work / "bundle").adapter_sources)
    source, merged = tensor_map(work / "model"), tensor_map(work / "merged")
    differing = [
        n for n, e in source.items() if b"".join(read_bytes(e)) != b"".join(read_bytes(merged[n]))
    ]
    outside = (
        [n for n in differing if int(n.split(".")[2]) not in adapter_blocks] if differing else []
    )
    return {"bundle_dtypes": sorted({e.dtype for e in tensor_map(work / "bundle").values()}),
            "merged_dtypes": sorted({e.dtype for e in merged.values()}),
            "tensors_changed": len(differing), "changed_outside_adapter_blocks": len(outside)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument(
        "--work", default=None, help="scratch folder (default: a temporary one, removed after)"
    )
    p.add_argument("--fit-steps", type=int, default=4,
                   help="also package with the default recipe (redundancy selection, layer-wise fitting of "
                   "this many steps per block), block by block; 0 skips it")  # fmt: skip
    p.add_argument(
        "--fit-sequences", type=int, default=16, help="sample sequences (256 tokens) it fits on"
    )
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        model_bytes = make_model(work / "model", args)
        copy = _run("copy", work)
        shutil.rmtree(work / "copy")  # a reference only: its 3 GB would crowd the page cache
        packaged = _run("package", work)
        bundle_bytes = sum(f.stat().st_size for f in (work / "bundle").glob("*.safetensors"))
        make_adapter(work)
        merged = _run("merge", work)
        limit = model_bytes / 2**20 / 4
        copy_speed = model_bytes / copy["seconds"]
        out = {"parameters": model_bytes // 2, "model_mib": round(model_bytes / 2**20), "bundle_mib": round(bundle_bytes / 2**20),
               "copy_seconds": round(copy["seconds"], 2), "copy_mb_per_s": round(copy_speed / 1e6),
               **{f"{k}_{m}": round(v[m], 2 if m == "seconds" else 0) for k, v in (("package", packaged), ("merge", merged))
                  for m in ("seconds", "peak_rss_mib", "baseline_rss_mib")},
               "package_peak_vs_model": round(packaged["peak_rss_mib"] / (model_bytes / 2**20), 3),
               "merge_peak_vs_model": round(merged["peak_rss_mib"] / (model_bytes / 2**20), 3),
               "peak_limit_mib": round(limit),
               # throughput against a copy of the same bytes: the bundle's for packaging, the model's for merging
               "package_time_vs_copy": round(packaged["seconds"] / (copy["seconds"] * bundle_bytes / model_bytes), 2),
               "merge_time_vs_copy": round(merged["seconds"] / copy["seconds"], 2),
               **check_merged(work)}  # fmt: skip
        if args.fit_steps:
            fitted = _run(f"package:{args.fit_steps}:{args.fit_sequences}", work)
            out.update({"fitted_steps_per_block": args.fit_steps, "fitted_sequences": args.fit_sequences,
                        "fitted_seconds": round(fitted["seconds"], 1), "fitted_peak_rss_mib": round(fitted["peak_rss_mib"]),
                        "fitted_peak_vs_model": round(fitted["peak_rss_mib"] / (model_bytes / 2**20), 3)})  # fmt: skip
        print(json.dumps(out))


if __name__ == "__main__":
    main()
