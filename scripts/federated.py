"""Several data owners: `python -m scripts.simulate --data-owners 3 --rounds 3 [--dp-epsilon 8]`.

One model-owner server process, one `owner federate` process and one `data-owner join` process
per data owner, over gRPC with mutual TLS. Each data owner holds a contiguous slice of the training
text (a different part of it: non-IID). The held-out text is --test if given, else the last
--holdout share of every data owner's slice (so it covers each owner's data equally, as the model
owner wants a model good for all of them). Afterwards a referee scores, on the held-out text, the
full model zero-shot, the plug-in after every round, each data owner alone (the same steps on
its slice alone, no exchange of adapters) and all the slices pooled (the same steps on all of it,
and, as the federation trained every owner, as many steps as all the owners together).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from scripts.processes import Phase, cli, fail, start_server

POOLED_ALL = "pooled data, the federation's total steps"
NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi")


def slices(text: str, n: int) -> list[str]:
    """`text` cut into `n` contiguous parts of about equal length, each cut moved to the next
    whitespace (each data owner gets a different part of the text: non-IID)."""
    cuts = [0]
    for i in range(1, n):
        at = max(len(text) * i // n, cuts[-1])
        while at < len(text) and not text[at].isspace():
            at += 1
        cuts.append(at)
    cuts.append(len(text))
    return [text[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def _train_flags(a: argparse.Namespace, block: str) -> list[str]:
    flags = ["--max-steps", str(a.steps), "--batch-size", str(a.batch_size), "--learning-rate", str(a.learning_rate),
             "--warmup-steps", "2", "--block-size", block, "--val-fraction", "0", "--seed", str(a.seed), "--save-every", "0"]  # fmt: skip
    if a.dp_epsilon:
        flags += ["--dp-epsilon", str(a.dp_epsilon)]
    return flags


def _run_rounds(
    a: argparse.Namespace, work: Path, home: Path, names: list[str], block: str
) -> None:
    server, address = start_server(home)
    procs = []
    try:
        members = ",".join(names)
        procs.append(subprocess.Popen([sys.executable, "-m", "owner.cli", "federate", "--home", str(home), "--name", "sim",
                                       "--bundle", str(work / "base"), "--model", a.model, "--members", members,
                                       "--rounds", str(a.rounds), "--poll", "1"], stdout=subprocess.DEVNULL))  # fmt: skip
        for name in names:
            d = work / name
            procs.append(subprocess.Popen([sys.executable, "-m", "data_owner.cli", "join", "--server", address,
                                           "--credentials", str(d / "credentials.json"), "--rounds", str(a.rounds),
                                           "--data", str(d / "train.txt"), "--work", str(d / "rounds"), "--poll", "1",
                                           "--round-schedule", a.round_schedule, *_train_flags(a, block)],
                                          stdout=subprocess.DEVNULL))  # fmt: skip
        while any(proc.poll() is None for proc in procs):  # a party that fails stops the simulation
            _check(procs)
            time.sleep(1)
        _check(procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        server.terminate()
        server.wait()


def _check(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() not in (None, 0):
            fail(
                f"`{' '.join(proc.args[2:4])}` failed (exit code {proc.returncode}); its error is above",
                1,
            )


def _alone(a: argparse.Namespace, bundle_dir: Path, data: Path, out: Path, block: str, owners: int = 1) -> Path:  # fmt: skip
    """The same local steps as all the rounds together (of `owners` data owners), on `data` alone
    (no exchange)."""
    flags = _train_flags(a, block)
    flags[1] = str(a.steps * a.rounds * owners)
    cli(
        "data-owner",
        "finetune",
        "--bundle",
        str(bundle_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        *flags,
    )
    return out


def referee(
    a: argparse.Namespace, task, home: Path, base: Path, adapters: dict[str, Path]
) -> list[dict]:
    """Held-out score of the full model zero-shot and with each adapter plugged in."""
    import copy

    from offsite.artefacts.adapter import open_adapter, plug_adapter, verify_adapter_for_bundle
    from offsite.artefacts.bundle import open_bundle
    from offsite.models.loading import load_model, load_tokenizer

    full, tok, bundle = load_model(a.model), load_tokenizer(a.model), open_bundle(base)
    zero = task.score(full, tok)["value"]
    rows = [{"setting": "full model zero-shot", "value": zero}]
    for label, path in adapters.items():
        plugged = copy.deepcopy(full)
        plug_adapter(plugged, verify_adapter_for_bundle(open_adapter(path), bundle))
        rows.append({"setting": label, "value": task.score(plugged, tok)["value"]})
        print(f"      {label}: {rows[-1]['value']:.2f}", flush=True)
    return rows


def held_out_per_owner(text: str, n: int, share: float) -> tuple[list[str], str]:
    """`text` cut into `n` owners' parts, the last `share` of each part held out: the owners'
    training texts, and a test text drawn equally from every owner's part (the model owner wants
    a model good on all of its data owners' data, not on whichever part lies next to the test)."""
    parts, train, test = slices(text, n), [], []
    for part in parts:
        cut = int(len(part) * (1 - share))
        while cut < len(part) and not part[cut].isspace():
            cut += 1
        train.append(part[:cut])
        test.append(part[cut:])
    return train, "\n".join(test)


def run(a: argparse.Namespace, task) -> None:
    """The federated simulation; prints the table and writes WORKDIR/results/federated.{json,md}."""
    from offsite.evaluation.tasks import PerplexityTask
    from offsite.training.data import read_text

    if not isinstance(task, PerplexityTask) or not 2 <= a.data_owners <= len(NAMES) or a.rounds < 1:
        fail(f"--data-owners takes a text task, 2 to {len(NAMES)} data owners and --rounds >= 1")
    parts = slices(task.train_text, a.data_owners)
    if a.test is None and not a.task:  # one text: every owner's part gives its share of the test
        parts, test_text = held_out_per_owner(read_text(Path(a.train)), a.data_owners, a.holdout)
        task = PerplexityTask(task.name, "".join(parts), test_text, task.block_size, a.eval_limit)
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    Phase.n, Phase.total = 0, 4
    home, names, block, t0 = (
        work / "home",
        list(NAMES[: a.data_owners]),
        str(a.block_size or 128),
        time.perf_counter(),
    )
    with Phase(f"model owner: keys, enrol {', '.join(names)}, package the base bundle"):
        cli("owner", "init", "--home", str(home))
        for name, part in zip(names, parts, strict=True):
            (work / name).mkdir()
            (work / name / "train.txt").write_text(part, encoding="utf-8")
            cli(
                "owner",
                "enroll",
                "--home",
                str(home),
                "--name",
                name,
                "--out",
                str(work / name / "credentials.json"),
            )
        (work / "pooled.txt").write_text(task.train_text, encoding="utf-8")
        pkg = ["package-emulator", "--model", a.model, "--out", str(work / "base")]
        for flag, value in (("--selection", a.selection), ("--emulator-layers", a.emulator_layers),
                            ("--layerwise-steps", a.layerwise_steps)):  # fmt: skip
            if value is not None:
                pkg += [flag, str(value)]
        if a.selection_data:
            pkg += ["--selection-data", a.selection_data]
        cli("owner", *pkg)
    with Phase(
        f"{len(names)} data owners x {a.rounds} rounds over gRPC + mutual TLS (owner federate, data-owner join)"
    ):
        _run_rounds(a, work, home, names, block)
    with Phase(
        "baselines: each data owner alone, and all the data pooled (same steps, no exchange)"
    ):
        alone = {
            n: _alone(a, work / "base", work / n / "train.txt", work / n / "alone", block)
            for n in names
        }
        pooled = _alone(a, work / "base", work / "pooled.txt", work / "pooled", block)
        # the federation trained every owner for all its steps: the same compute on pooled data
        pooled_all = _alone(
            a, work / "base", work / "pooled.txt", work / "pooled-all", block, len(names)
        )
    with Phase(f"referee: held-out {task.metric} of every plug-in"):
        rounds = {
            f"federated, after round {r + 1}": home
            / "federations"
            / "sim"
            / f"round-{r}"
            / "aggregate"
            for r in range(a.rounds)
        }
        adapters = {**rounds, **{f"{n} alone": p for n, p in alone.items()}, "pooled data": pooled,
                    POOLED_ALL: pooled_all}  # fmt: skip
        rows = referee(a, task, home, work / "base", adapters)
    _report(a, rows, work, time.perf_counter() - t0)


def _report(a: argparse.Namespace, rows: list[dict], work: Path, seconds: float) -> None:
    value = {r["setting"]: r["value"] for r in rows}
    zero, final = rows[0]["value"], rows[a.rounds]["value"]
    gains = {k: (zero - final) / (zero - value[k]) if zero != value[k] else float("nan")
             for k in ("pooled data", POOLED_ALL)}  # fmt: skip
    gain = gains["pooled data"]
    lines = ["| setting | held-out perplexity |", "|---|---|"] + [
        f"| {r['setting']} | {r['value']:.2f} |" for r in rows
    ]
    dp = f", DP epsilon {a.dp_epsilon} per data owner per round" if a.dp_epsilon else ""
    summary = (f"Federated ({a.data_owners} data owners, {a.rounds} rounds of {a.steps} steps{dp}): "
               f"{100 * gain:.0f}% of the pooled-data plug-in's gain over zero-shot, "
               f"{100 * gains[POOLED_ALL]:.0f}% of the gain with the same total steps on pooled data ({seconds:.0f} s in all)")  # fmt: skip
    (work / "results").mkdir(exist_ok=True)
    (work / "results" / "federated.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "gain_vs_pooled": gain,
                "gain_vs_pooled_same_total_steps": gains[POOLED_ALL],
                "args": vars(a),
            },
            indent=2,
        )  # fmt: skip
    )
    (work / "results" / "federated.md").write_text("\n".join(lines) + "\n\n" + summary + "\n")
    print("\n" + "\n".join(lines) + "\n\n" + summary)
