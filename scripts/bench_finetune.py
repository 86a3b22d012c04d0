"""Benchmark: data-owner fine-tuning through the emulator (whole adapter blocks, or LoRA inside
them) against full-model fine-tuning, in float32 and bf16 mixed precision, over the same batches.

    python -m scripts.bench_finetune        # smollm2-135m, 2+2 adapter, 13 of 26 middle kept

Each configuration runs in its own process (so its peak memory is its own) and prints one JSON
line: tokens/s, peak memory, FLOPs per token (LoRA counted honestly: frozen weights get no weight
gradients), achieved FLOP/s and the matmul peak measured in the same precision at the shapes the
model multiplies. A last line compares them against the targets: speed ratio vs the FLOP
prediction, memory ratios, bf16 speed-up and the bf16 loss curve against float32.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import torch

from offsite.artefacts.bundle import open_bundle
from offsite.artefacts.peft_delta import PeftOptions, attach
from offsite.emulator.package import package_emulator
from offsite.emulator.plan import make_plan
from offsite.evaluation.five_settings import FULL_LEARNING_RATE
from offsite.models.architectures import block_matmuls, num_blocks
from offsite.models.flops import finetune_flops_per_token
from offsite.models.loading import load_model, load_tokenizer
from offsite.training.allocator import limit_heap_growth
from offsite.training.config import TrainConfig
from offsite.training.data import load_data, pad_id_of
from offsite.training.finetune import (
    ADAPTER_LEARNING_RATE,
    freeze_except_adapter,
    hold_frozen_weights,
)
from offsite.training.loop import train
from scripts.memory import peak_rss_mib

SAMPLE = "data/samples/shakespeare-train.txt"
SETTINGS = ("full", "offsite", "offsite_ckpt", "offsite_lora", "offsite_lora_ckpt")
# `--low-memory` (the allocator's threshold fixed; in float32 with checkpointing the bf16
# bundle's frozen weights held in bf16): against full fine-tuning with and without it
LOW_MEMORY = [("full_lowmem", "no"), ("offsite_lora_ckpt_lowmem", "no"), ("offsite_lora_ckpt_lowmem", "bf16")]  # fmt: skip
CONFIGS = [(s, p) for s in SETTINGS for p in ("no", "bf16")] + LOW_MEMORY
DTYPES = {"no": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(shapes: list[tuple[int, int, int]], dtype: torch.dtype, reps: int = 5) -> float:
    """Best achieved FLOP/s of an (m x k) @ (k x n) matmul in `dtype` over `shapes`."""
    best = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b
        seconds = min(_timed(lambda a=a, b=b: a @ b) for _ in range(reps))
        best = max(best, 2 * m * k * n / seconds)
    return best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def model_shapes(model, tokens: int) -> list[tuple[int, int, int]]:
    """The forward matmul shapes of one block and the LM head at `tokens` tokens, and 2048^3."""
    shapes = set()
    for module, out_axis in block_matmuls(model, [0]):
        weight = module.weight.shape
        shapes.add((tokens, weight[1 - out_axis], weight[out_axis]))
    head = model.get_output_embeddings()
    return sorted(shapes | {(tokens, head.in_features, head.out_features), (2048, 2048, 2048)})


def _run(setting: str, precision: str, args: argparse.Namespace, bundle_dir: str, queue) -> None:
    low_memory = setting.endswith("_lowmem")
    setting = setting.removesuffix("_lowmem")
    if low_memory:  # as `data-owner finetune --low-memory` does, before anything is loaded
        limit_heap_growth()
    torch.manual_seed(0)
    base_rss = peak_rss_mib()
    tokenizer = load_tokenizer(args.model)
    if setting.startswith("offsite"):  # exactly what the data owner loads: the bundle
        bundle = open_bundle(bundle_dir)
        model = bundle.load_model(dtype=torch.float32)
        if setting.startswith("offsite_lora"):
            model = attach(
                model, PeftOptions("lora", rank=args.lora_rank), bundle.adapter_positions
            )
        else:
            freeze_except_adapter(model, bundle)
    else:
        model = load_model(args.model, torch.float32)  # float32 master weights, as measured
        model.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data = load_data(args.data, tokenizer, args.block_size)
    # each at the rate it trains at (the loss curves compare precisions; the speed does not depend on it)
    lr = FULL_LEARNING_RATE if setting == "full" else ADAPTER_LEARNING_RATE
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, learning_rate=lr, save_every=0,
                      mixed_precision=precision, gradient_checkpointing=setting.endswith("_ckpt"))  # fmt: skip
    if setting.startswith("offsite"):  # as data-owner finetune does (bf16: frozen weights in bf16)
        hold_frozen_weights(model, cfg, low_memory=low_memory)
    times: list[float] = []
    summary = train(model, data, cfg, pad_id=pad_id_of(tokenizer),
                    on_step=lambda info: times.append(time.perf_counter()))  # fmt: skip
    timed = times[args.warmup :]
    step_s = (timed[-1] - timed[0]) / (len(timed) - 1)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_rss_mib()
    )
    queue.put({"config": setting + ("_lowmem" if low_memory else ""), "precision": precision, "step_s": step_s, "trainable_parameters": trainable,
               "tokens_per_s": args.batch_size * args.block_size / step_s, "peak_mib": peak,
               "above_baseline_mib": peak - base_rss, "losses": [h["loss"] for h in summary["history"]]})  # fmt: skip


def _measure(args: argparse.Namespace, bundle_dir: str) -> dict[tuple[str, str], dict]:
    ctx, results = mp.get_context("spawn"), {}
    for setting, precision in CONFIGS:
        queue = ctx.Queue()
        proc = ctx.Process(target=_run, args=(setting, precision, args, bundle_dir, queue))
        proc.start()
        results[setting, precision] = queue.get()
        proc.join()
    return results


def _summary(rows: dict[tuple[str, str], dict], flops: dict) -> dict:
    """The figures the targets are stated in."""
    out: dict = {"summary": True}
    for p in ("no", "bf16"):
        full, off, off_ckpt, lora, ckpt = (rows[s, p] for s in SETTINGS)
        predicted = flops["full"]["total"] / flops["offsite_lora"]["total"]
        speed = lora["tokens_per_s"] / full["tokens_per_s"]
        out[p] = {"lora_speed_ratio": round(speed, 3), "lora_flop_predicted_ratio": round(predicted, 3),
                  "lora_speed_vs_predicted": round(speed / predicted, 3),
                  "lora_memory_ratio": round(lora["peak_mib"] / full["peak_mib"], 3),
                  "lora_memory_ratio_above_baseline": round(lora["above_baseline_mib"] / full["above_baseline_mib"], 3),
                  "lora_checkpointing_memory_ratio": round(ckpt["peak_mib"] / full["peak_mib"], 3),
                  "lora_checkpointing_speed_ratio": round(ckpt["tokens_per_s"] / full["tokens_per_s"], 3),
                  "blocks_memory_ratio": round(off["peak_mib"] / full["peak_mib"], 3),
                  "blocks_memory_ratio_above_baseline": round(off["above_baseline_mib"] / full["above_baseline_mib"], 3),
                  "blocks_checkpointing_memory_ratio": round(off_ckpt["peak_mib"] / full["peak_mib"], 3)}  # fmt: skip
    low, low_full = rows["offsite_lora_ckpt_lowmem", "no"], rows["full_lowmem", "no"]
    out["low_memory"] = {"lora_checkpointing_memory_ratio": round(low["peak_mib"] / rows["full", "no"]["peak_mib"], 3),
                         "against_full_with_low_memory": round(low["peak_mib"] / low_full["peak_mib"], 3),
                         "speed_vs_default": round(low["tokens_per_s"] / rows["offsite_lora_ckpt", "no"]["tokens_per_s"], 3),
                         "full_speed_vs_default": round(low_full["tokens_per_s"] / rows["full", "no"]["tokens_per_s"], 3)}  # fmt: skip
    for s in SETTINGS:
        fp32, bf16 = rows[s, "no"], rows[s, "bf16"]
        gap = max(abs(a - b) / a for a, b in zip(fp32["losses"], bf16["losses"], strict=True))
        out[f"{s}_bf16_speedup"] = round(bf16["tokens_per_s"] / fp32["tokens_per_s"], 3)
        out[f"{s}_bf16_loss_max_relative_difference"] = round(gap, 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--emulator-layers", type=int, default=13)
    parser.add_argument("--data", default=SAMPLE)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--lora-rank", type=int, default=8)
    args = parser.parse_args()

    model = load_model(args.model)  # also converts a GGUF once, outside the measured processes
    config, tokens = model.config, args.batch_size * args.block_size
    plan = make_plan(num_blocks(config), emulator_layers=args.emulator_layers)
    shapes = model_shapes(model, tokens)
    with tempfile.TemporaryDirectory() as tmp:
        package_emulator(model, load_tokenizer(args.model), plan, Path(tmp) / "bundle", base_name=args.model,
                         inplace=True)  # fmt: skip
        del model
        rows = _measure(args, str(Path(tmp) / "bundle"))
    flops = finetune_flops_per_token(config, emulator_depth=len(plan.emulator_order), adapter_blocks=len(plan.adapter),
                                     seq_len=args.block_size, lora_rank=args.lora_rank)  # fmt: skip
    peaks = {p: matmul_peak(shapes, DTYPES[p]) for p in DTYPES}
    for (setting, precision), row in rows.items():
        counted = flops[setting.removesuffix("_lowmem").removesuffix("_ckpt")]
        step_flops = counted["total"] * tokens / row["step_s"]  # recompute not counted
        print(json.dumps({"model": args.model, **{k: v for k, v in row.items() if k != "losses"},
                          "tokens_per_step": tokens, "steps_timed": args.steps - args.warmup,
                          "flops_per_token": counted, "step_gflops": round(step_flops / 1e9, 1),
                          "matmul_peak_gflops": round(peaks[precision] / 1e9, 1),
                          "vs_peak": round(step_flops / peaks[precision], 3), "losses": row["losses"],
                          "memory_kind": "cuda max_memory_allocated" if torch.cuda.is_available() else "process peak RSS"}))  # fmt: skip
    print(json.dumps(_summary(rows, flops)))


if __name__ == "__main__":
    main()
