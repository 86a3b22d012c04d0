"""Prototype (not a library option): where the bf16 emulator fine-tuning step's time goes, and what
`torch.compile` of the emulator's blocks and of the chunked loss buys.

    PYTHONPATH=. python docs/results/compile-probe-prototype.py plain profile compile compile_all plain compile_all

SmolLM2-135M, 2+2 adapter, 13 of 26 middle blocks kept (uniform, as `scripts/bench_finetune.py`),
whole adapter blocks, bf16 mixed precision with the frozen weights held in bf16 (as `data-owner
finetune --mixed-precision bf16` does), 10 steps of 4x256 tokens of the Shakespeare sample (the
first 2 not timed). Modes: `plain` (eager), `profile` (eager under torch.profiler, 6 steps: each
operator's share of self CPU time), `compile` (each of the 17 blocks `.compile()`d, the recompile
limits raised so that every block gets its graph), `compile_all` (the same and the loss's per-chunk
head + NLL). Each mode prints one JSON line with the step's FLOP/s against the bf16 matmul peak at
the model's shapes, measured right after it (the machine's speed drifts: compare lines of one run).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from offsite.artefacts.bundle import open_bundle
from offsite.emulator.package import package_emulator
from offsite.emulator.plan import make_plan
from offsite.models.architectures import get_blocks, num_blocks
from offsite.models.flops import finetune_flops_per_token
from offsite.models.loading import load_model, load_tokenizer
from offsite.training import loss
from offsite.training.data import load_data, pad_id_of
from offsite.training.finetune import (
    ADAPTER_LEARNING_RATE,
    freeze_except_adapter,
    hold_frozen_weights,
)
from offsite.training.loop import TrainConfig, train
from scripts.bench_finetune import matmul_peak, model_shapes

MODEL, TOKENS = "smollm2-135m", 4 * 256
BUNDLE = Path("runs/compile-probe/bundle")
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")
ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::_scaled_dot_product_flash_attention_for_cpu_backward")  # fmt: skip


def _compile(model, with_loss: bool) -> None:
    import torch._dynamo as dynamo

    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):  # fmt: skip
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, 512)
    for block in get_blocks(model):
        block.compile()
    if with_loss:
        loss._chunk_nll = torch.compile(loss._chunk_nll)


def run(mode: str) -> dict:
    torch.manual_seed(0)
    tok = load_tokenizer(MODEL)
    bundle = open_bundle(BUNDLE)
    model = bundle.load_model(dtype=torch.float32)
    freeze_except_adapter(model, bundle)
    steps = 6 if mode == "profile" else 10
    cfg = TrainConfig(max_steps=steps, batch_size=4, learning_rate=ADAPTER_LEARNING_RATE, save_every=0, mixed_precision="bf16")  # fmt: skip
    hold_frozen_weights(model, cfg)
    if mode.startswith("compile"):
        _compile(model, with_loss=mode == "compile_all")
    data = load_data("data/samples/shakespeare-train.txt", tok, 256)
    times = [time.perf_counter()]
    prof = None
    if mode == "profile":
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU])
        prof.__enter__()
    summary = train(model, data, cfg, pad_id=pad_id_of(tok), on_step=lambda _: times.append(time.perf_counter()))  # fmt: skip
    out = {"mode": mode, "first_step_s": round(times[1] - times[0], 1),
           "tokens_per_s": round(TOKENS * (len(times) - 3) / (times[-1] - times[2]), 1),
           "losses": [round(h["loss"], 4) for h in summary["history"]]}  # fmt: skip
    if prof is not None:
        prof.__exit__(None, None, None)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)

        def share(keys) -> float:
            return round(sum(e.self_cpu_time_total for e in events if e.key in keys) / total, 3)

        out.update(matmul_share=share(MATMULS), attention_share=share(ATTENTION),
                   top=[(e.key, round(e.self_cpu_time_total / total, 3))
                        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]])  # fmt: skip
    peak = matmul_peak(model_shapes(model, TOKENS), torch.bfloat16)
    # the emulator's config: block sizes as the full model's; its depth is given
    flops = finetune_flops_per_token(model.config, emulator_depth=17, adapter_blocks=4, seq_len=256)["offsite"]["total"]  # fmt: skip
    out.update(
        peak_gflops=round(peak / 1e9, 1), vs_peak=round(flops * out["tokens_per_s"] / peak, 3)
    )
    return out


if __name__ == "__main__":
    if not BUNDLE.exists():
        full = load_model(MODEL)
        plan = make_plan(num_blocks(full.config), emulator_layers=13)
        package_emulator(full, load_tokenizer(MODEL), plan, BUNDLE, base_name=MODEL, inplace=True)
        del full
    for mode in sys.argv[1:] or ["plain", "compile_all"]:
        print(json.dumps(run(mode)), flush=True)
