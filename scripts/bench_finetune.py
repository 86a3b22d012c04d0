"""Benchmark: data-owner fine-tuning through the emulator vs full-model fine-tuning, same batches.

    python -m scripts.bench_finetune                  # smollm2-135m, 2+2 adapter, 13 of 26 middle kept

Each setting runs in its own process (so peak memory is its own) over the same batches. Prints
one JSON line: tokens/s and peak memory of each, their ratios, the speed ratio a FLOP count
predicts, each step's achieved FLOP/s and a matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import torch

from offsite.artefacts.bundle import open_bundle
from offsite.emulator.package import package_emulator
from offsite.emulator.plan import make_plan
from offsite.models.architectures import num_blocks
from offsite.models.flops import finetune_flops_per_token
from offsite.models.loading import load_model, load_tokenizer
from offsite.training.data import load_data, pad_id_of
from offsite.training.finetune import freeze_except_adapter
from offsite.training.loop import TrainConfig, train

SAMPLE = "data/samples/shakespeare-train.txt"


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    """Achieved FLOP/s of a square float32 matmul on this machine, best of `reps`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run(setting: str, args: argparse.Namespace, bundle_dir: str, queue) -> None:
    torch.manual_seed(0)
    base_rss = _rss_mib()
    tokenizer = load_tokenizer(args.model)
    if setting == "offsite":  # exactly what the data owner loads: the bundle, adapter trainable
        bundle = open_bundle(bundle_dir)
        model = bundle.load_model(dtype=torch.float32)
        freeze_except_adapter(model, bundle)
    else:
        model = load_model(args.model)
    data = load_data(args.data, tokenizer, args.block_size)
    cfg = TrainConfig(
        max_steps=args.steps, batch_size=args.batch_size, learning_rate=1e-5, save_every=0
    )
    times: list[float] = []
    train(
        model,
        data,
        cfg,
        pad_id=pad_id_of(tokenizer),
        on_step=lambda info: times.append(time.perf_counter()),
    )
    timed = times[args.warmup :]
    step_s = (timed[-1] - timed[0]) / (len(timed) - 1)
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else _rss_mib()
    queue.put({"setting": setting, "step_s": step_s, "tokens_per_s": args.batch_size * args.block_size / step_s,
               "peak_mib": peak, "baseline_mib": base_rss})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--emulator-layers", type=int, default=13)
    parser.add_argument("--data", default=SAMPLE)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    args = parser.parse_args()

    model = load_model(args.model)  # also converts a GGUF once, outside the measured processes
    config = model.config
    plan = make_plan(num_blocks(config), emulator_layers=args.emulator_layers)
    ctx = mp.get_context("spawn")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        package_emulator(
            model,
            load_tokenizer(args.model),
            plan,
            Path(tmp) / "bundle",
            base_name=args.model,
            inplace=True,
        )
        del model
        for setting in ("offsite", "full"):
            queue = ctx.Queue()
            proc = ctx.Process(target=_run, args=(setting, args, str(Path(tmp) / "bundle"), queue))
            proc.start()
            results[setting] = queue.get()
            proc.join()
    peak = matmul_peak()

    flops = finetune_flops_per_token(
        config,
        emulator_depth=len(plan.emulator_order),
        adapter_blocks=len(plan.adapter),
        seq_len=args.block_size,
    )
    step_tokens = args.batch_size * args.block_size
    off, full = results["offsite"], results["full"]
    speed_ratio = off["tokens_per_s"] / full["tokens_per_s"]
    predicted = flops["full"]["total"] / flops["offsite"]["total"]
    out = {
        "model": args.model, "adapter_blocks": list(plan.adapter), "kept_blocks": list(plan.kept),
        "tokens_per_step": step_tokens, "steps_timed": args.steps - args.warmup,
        "offsite_tokens_per_s": round(off["tokens_per_s"], 1), "full_tokens_per_s": round(full["tokens_per_s"], 1),
        "speed_ratio": round(speed_ratio, 3), "flop_predicted_ratio": round(predicted, 3),
        "speed_vs_predicted": round(speed_ratio / predicted, 3),
        "offsite_peak_mib": round(off["peak_mib"]), "full_peak_mib": round(full["peak_mib"]),
        "memory_ratio": round(off["peak_mib"] / full["peak_mib"], 3),
        "memory_ratio_above_baseline": round((off["peak_mib"] - off["baseline_mib"]) / (full["peak_mib"] - full["baseline_mib"]), 3),
        "matmul_peak_gflops": round(peak / 1e9, 1),
        "offsite_step_gflops": round(flops["offsite"]["total"] * step_tokens / off["step_s"] / 1e9, 1),
        "full_step_gflops": round(flops["full"]["total"] * step_tokens / full["step_s"] / 1e9, 1),
        "flops_per_token": flops,
    }  # fmt: skip
    out["offsite_vs_peak"] = round(out["offsite_step_gflops"] / out["matmul_peak_gflops"], 3)
    out["full_vs_peak"] = round(out["full_step_gflops"] / out["matmul_peak_gflops"], 3)
    out["memory_kind"] = (
        "cuda max_memory_allocated" if torch.cuda.is_available() else "process peak RSS"
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
