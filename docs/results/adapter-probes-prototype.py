"""Prototype behind docs/results/adapter-probes-shakespeare.jsonl: four ways of making the data owner's
adapter carry more of its gain to the full model, tried on the default half-depth emulator
(redundancy selection + layer-wise fitting, built once and cached in EMU), the Shakespeare sample,
40 steps of 4x128 at lr 1e-3 (ceiling 28.917 and zero-shot 62.013 from the transfer study).
Run from the repository root, one probe at a time:

    OMP_NUM_THREADS=2 PYTHONPATH=. python docs/results/adapter-probes-prototype.py scale
    ... lr 0.3 | lr 3 | depth-dropout 0.15 | share | repair | seed 1

scale: the returned update scaled per role at plug-in (bottom/top); lr M: the bottom adapter at M
times the learning rate; depth-dropout P: each kept middle block skipped with probability P in
every training step; share: a depth-preserving emulator, each kept block applied once per block
of its span (weights shared) and fitted layer-wise so the repeated block maps the span's input to
its output; repair: the owner first trains the adapter through the emulator on its own sample
(40 steps), ships that as the adapter's start, and plugs in only the data owner's update from it.
seed N: the default again with another batch order (the spread between runs).
Kept as the record of how those rows were measured; not part of the library (none helps).
"""

import copy
import json
import math
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

import offsite.training.loop as loop
from offsite.artefacts.adapter import plug_adapter
from offsite.emulator.build import build_emulator
from offsite.emulator.layerwise import _capture, _relative_error, spans
from offsite.emulator.package import package_emulator
from offsite.emulator.plan import make_plan
from offsite.emulator.recipe import PUBLIC_SAMPLE, EmulatorRecipe, make_emulator
from offsite.evaluation.tasks import PerplexityTask
from offsite.models.architectures import get_blocks, num_blocks, set_blocks
from offsite.models.loading import load_model, load_tokenizer
from offsite.training.data import TokenData, load_data, pad_id_of
from offsite.training.finetune import make_trainable, trained_adapter
from offsite.training.loop import TrainConfig, train

EMU, ZS, FT = Path("/tmp/adapter-probes-emulator.pt"), 62.013, 28.917
CFG = TrainConfig(max_steps=40, batch_size=4, learning_rate=1e-3, warmup_steps=2, save_every=0)


def default_emulator(full, tok):
    if EMU.exists():
        saved = torch.load(EMU, weights_only=False)
        emulator = build_emulator(full, saved["plan"])
        emulator.load_state_dict(saved["state"])
        return emulator, saved["plan"]
    plan = make_plan(num_blocks(full.config), adapter_bottom=2, adapter_top=2)
    emulator, plan, _ = make_emulator(full, tok, plan, EmulatorRecipe())
    torch.save({"plan": plan, "state": emulator.state_dict()}, EMU)
    return emulator, plan


def student_of(full, tok, plan, emulator):
    with tempfile.TemporaryDirectory() as tmp:
        bundle = package_emulator(
            full, tok, plan, Path(tmp) / "b", base_name="p", emulator=emulator
        )
        student = bundle.load_model(dtype=torch.float32)
    return make_trainable(student, bundle, None)[0], bundle


def plugged_score(full, task, tok, state) -> float:
    model = copy.deepcopy(full)
    plug_adapter(model, state)
    return task.score(model, tok)["value"]


def row(**r):
    if "plug" in r:
        r.update(gap=(r["plug"] - ZS) / (FT - ZS), margin=r["emu_ft"] / r["plug"])
    print(json.dumps(r), flush=True)


def per_role_optimizer(layers, bottom_mult):
    def make(model, cfg, steps):
        groups = [{"params": [p for p in layer.parameters() if p.requires_grad],
                   "lr": cfg.learning_rate * (bottom_mult if i < 2 else 1.0)} for i, layer in enumerate(layers)]  # fmt: skip
        groups = [g for g in groups if g["params"]]
        opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        return [p for g in groups for p in g["params"]], opt, loop._schedule(opt, cfg, steps)

    return make


def depth_dropout(middle, p):
    def skip(module, args, kwargs, output):
        if module.training and torch.rand(()) < p:
            h = args[0] if args else kwargs["hidden_states"]
            return (h, *output[1:]) if isinstance(output, tuple) else h
        return output

    return [m.register_forward_hook(skip, with_kwargs=True) for m in middle]


def share_emulator(full, plan, steps=60, lr=3e-4):
    """Full-depth emulator: each kept block repeated over its span, fitted (emulator's own chain)."""
    table = spans(plan)
    sample = load_data(PUBLIC_SAMPLE, load_tokenizer("smollm2-135m"), 256)
    cache = _capture(
        full, TokenData(sample.examples[:64], "s", "0", "packed"), 4, table, grads=False
    )
    emu = copy.deepcopy(full)
    order = [*plan.adapter[:2], *[k for k, s, e in table for _ in range(e - s)], *plan.adapter[2:]]
    set_blocks(emu, order)
    blocks, chain = get_blocks(emu), [b["in"][table[0][1]] for b in cache]

    def repeat(block, call, x, m):
        for _ in range(m):
            x = call.run(block, x)
        return x

    for k, s, e in table:
        block, calls, targets = (
            blocks[order.index(k)],
            [b["call"][k] for b in cache],
            [b["out"][e - 1] for b in cache],
        )
        block.train().requires_grad_(True)
        opt = torch.optim.AdamW(block.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps))
        )
        for step in range(steps):
            i = step % len(chain)
            _relative_error(repeat(block, calls[i], chain[i], e - s), targets[i]).backward()
            torch.nn.utils.clip_grad_norm_(block.parameters(), 1.0)
            opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        block.eval().requires_grad_(False)
        with torch.no_grad():
            chain = [repeat(block, calls[i], x, e - s) for i, x in enumerate(chain)]
    return emu


def main() -> None:
    probe, arg = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else None
    full, tok = load_model("smollm2-135m", torch.float32), load_tokenizer("smollm2-135m")
    full.requires_grad_(False)
    s = Path("data/samples")
    task = PerplexityTask.from_files(
        s / "shakespeare-train.txt", s / "shakespeare-test.txt", 128, 48
    )
    data = task.train_data(tok)
    if probe == "share":
        emu = share_emulator(full, default_emulator(full, tok)[1])
        zs = task.score(emu, tok)["value"]
        blocks = get_blocks(emu)
        emu.requires_grad_(False)
        # the depth is kept, so the adapter sits at the full model's positions
        for pos in (0, 1, len(blocks) - 2, len(blocks) - 1):
            blocks[pos].requires_grad_(True)
        train(emu, data, CFG, pad_id=pad_id_of(tok))
        emu.eval()
        state = {
            k: v for k, v in emu.state_dict().items() if k.split(".")[2] in {"0", "1", "28", "29"}
        }
        row(
            probe="share",
            emu_zs=zs,
            emu_ft=task.score(emu, tok)["value"],
            plug=plugged_score(full, task, tok, state),
        )
        return
    emulator, plan = default_emulator(full, tok)
    student, bundle = student_of(full, tok, plan, emulator)
    layers = get_blocks(student)
    start = None
    if probe == "repair":  # the owner's repair on its own sample, shipped as the adapter's start
        train(
            student, load_data(PUBLIC_SAMPLE, tok, 128), replace(CFG, seed=7), pad_id=pad_id_of(tok)
        )
        start = {
            k: v.detach().clone().float()
            for k, v in trained_adapter(student, bundle, None)[0].items()
        }
        student.eval()
        repaired_zs = task.score(student, tok)["value"]
        student.train()
    hooks = depth_dropout(list(layers)[2:-2], arg) if probe == "depth-dropout" else []
    if probe == "lr":
        loop._optimizer = per_role_optimizer(layers, arg)
    cfg = replace(CFG, seed=int(arg)) if probe == "seed" else CFG
    train(student, data, cfg, pad_id=pad_id_of(tok))
    for h in hooks:
        h.remove()
    student.eval()
    emu_ft = task.score(student, tok)["value"]
    state = {k: v.float() for k, v in trained_adapter(student, bundle, None)[0].items()}
    base = {k: v for k, v in full.state_dict().items() if k in state}
    if probe == "scale":  # bottom (full-model blocks 0, 1) and top (28, 29) updates scaled apart
        for a, b in [(1, 1), (0, 1), (1, 0), (0.5, 1), (1.5, 1), (1, 1.5), (0.5, 1.5)]:
            scaled = {
                k: base[k] + (a if int(k.split(".")[2]) < 2 else b) * (v - base[k])
                for k, v in state.items()
            }
            row(
                probe="scale",
                bottom=a,
                top=b,
                emu_ft=emu_ft,
                plug=plugged_score(full, task, tok, scaled),
            )
    elif probe == "repair":
        delta = {k: base[k] + v - start[k] for k, v in state.items()}
        row(probe="repair", emu_repaired_zs=repaired_zs, plug_repair_only=plugged_score(full, task, tok, start),
            plug_whole=plugged_score(full, task, tok, state), emu_ft=emu_ft, plug=plugged_score(full, task, tok, delta))  # fmt: skip
    else:
        row(probe=probe, arg=arg, emu_ft=emu_ft, plug=plugged_score(full, task, tok, state))


if __name__ == "__main__":
    main()
