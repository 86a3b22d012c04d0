"""Demo of the core pipeline on the real SmolLM2-135M, exchanging artefacts through directories.

    python -m scripts.demo [--steps 30] [--emulator-layers 23] [--workdir runs/demo]

Model owner: package an emulator bundle. Data owner: fine-tune the adapter on the shipped
Shakespeare sample. Model owner: verify and merge the adapter. Then perplexity on held-out text
for the full model, the emulator alone, the emulator with the adapter, and the merged model.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import time
from pathlib import Path

from data_owner.cli import main as data_owner
from owner.cli import main as owner

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


def _step(title: str, fn, argv: list[str]) -> dict:
    print(
        f"\n== {title}\n   $ {'owner' if fn is owner else 'data-owner'} {' '.join(argv)}",
        flush=True,
    )
    t = time.perf_counter()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = fn(argv)
    if code != 0:
        raise SystemExit(code)
    print(f"   done in {time.perf_counter() - t:.0f} s", flush=True)
    return json.loads(out.getvalue())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--train", default=str(SAMPLES / "shakespeare-train.txt"))
    p.add_argument("--test", default=str(SAMPLES / "shakespeare-test.txt"))
    p.add_argument("--emulator-layers", default="23")
    p.add_argument("--steps", default="30")
    p.add_argument("--workdir", default="runs/demo")
    a = p.parse_args()

    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    bundle, adapter, merged = str(work / "bundle"), str(work / "adapter"), str(work / "merged")
    ev = ["--data", a.test, "--block-size", "256", "--max-sequences", "16"]
    _step("model owner: package the emulator bundle", owner,
          ["package-emulator", "--model", a.model, "--out", bundle, "--emulator-layers", a.emulator_layers])  # fmt: skip
    full = _step("model owner: full model zero-shot", owner, ["evaluate", "--model", a.model, *ev])
    emu = _step("data owner: emulator zero-shot", data_owner, ["evaluate", "--bundle", bundle, *ev])
    _step("data owner: fine-tune the adapter on private data", data_owner,
          ["finetune", "--bundle", bundle, "--data", a.train, "--out", adapter, "--max-steps", a.steps,
           "--batch-size", "4", "--block-size", "128", "--learning-rate", "2e-4", "--warmup-steps", "2"])  # fmt: skip
    emu_ft = _step(
        "data owner: emulator fine-tuned",
        data_owner,
        ["evaluate", "--bundle", bundle, "--adapter", adapter, *ev],
    )
    _step("model owner: verify and merge the adapter", owner,
          ["merge-adapter", "--model", a.model, "--adapter", adapter, "--bundle", bundle, "--out", merged])  # fmt: skip
    plug = _step("model owner: plug-in (merged model)", owner, ["evaluate", "--model", merged, *ev])

    print(f"\nHeld-out perplexity ({Path(a.test).name}, lower is better)")
    print("| setting | perplexity |\n|---|---|")
    for name, r in [("full model zero-shot", full), ("emulator zero-shot", emu),
                    ("emulator fine-tuned", emu_ft), ("plug-in (full + adapter)", plug)]:  # fmt: skip
        print(f"| {name} | {r['perplexity']:.2f} |")


if __name__ == "__main__":
    main()
