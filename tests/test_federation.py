"""FedAvg rounds over the real exchange: quorum, stragglers, restarts, stale adapters, the math."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from exchange_env import make_env, signer_of, thread_server
from helpers import copy_tree as _copy_tree
from helpers import expect_error
from safetensors.torch import load_file
from tiny import CORPUS, DEPTH

from offsite.artefacts.adapter import ADAPTER_MANIFEST, WEIGHTS_NAME, open_adapter
from offsite.artefacts.bundle import open_bundle
from offsite.emulator.package import package_emulator
from offsite.emulator.plan import make_plan
from offsite.errors import VerificationError
from offsite.exchange.federation import AGGREGATE, FederationSpec, advance, fedavg, round_dir, start
from offsite.exchange.home import enroll
from offsite.models.loading import load_model, load_tokenizer
from offsite.training.config import TrainConfig
from offsite.training.finetune import FinetuneJob, finetune_bundle, round_schedule
from offsite.transport.client import TransportError, connect
from offsite.transport.join import join
from owner.cli import main as owner


def test_fedavg_is_the_token_weighted_mean():
    a = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([0.0], dtype=torch.bfloat16)}
    b = {"w": torch.tensor([5.0, 6.0]), "h": torch.tensor([4.0], dtype=torch.bfloat16)}
    out = fedavg([a, b], [1, 3])
    assert torch.equal(out["w"], torch.tensor([4.0, 5.0])) and out["h"].dtype == torch.bfloat16
    assert out["h"].item() == 3.0


@pytest.fixture
def fed(tmp_path):
    home, creds, _ = make_env(tmp_path, ["acme", "bob", "carol"])
    creds["dave"] = enroll(home, "dave")  # enrolled, not a member
    model = load_model(str(tmp_path / "model"))
    package_emulator(model, load_tokenizer(str(tmp_path / "model")), make_plan(DEPTH, emulator_layers=2),
                     tmp_path / "base", base_name="m")  # fmt: skip
    (tmp_path / "d.txt").write_text(CORPUS)
    spec = FederationSpec("f1", tmp_path / "base", str(tmp_path / "model"), ("acme", "bob", "carol"), rounds=2,
                          quorum=2, deadline_s=600)  # fmt: skip
    start(home, spec)
    return home, creds, spec, tmp_path


def _train(creds, steps):
    def train(bundle, out):
        job = FinetuneJob(out.parent.parent / "d.txt", out, block_size=16, val_fraction=0.0)
        cfg = TrainConfig(max_steps=steps, batch_size=2, learning_rate=1e-2)  # as `join` trains:
        return finetune_bundle(
            bundle, job, round_schedule(cfg, bundle), signer=signer_of(creds)
        ).path

    return train


def test_rounds_close_at_quorum_record_stragglers_and_survive_restarts(fed):
    home, creds, spec, root = fed
    assert advance(home, "f1")["state"] == "issued"
    issued = advance(home, "f1")  # a restarted owner finds the same round, issues nothing again
    assert issued["state"] == "waiting" and set(issued["members"].values()) == {"issued"}
    with thread_server(home) as address:
        joined = {}
        for name, steps in (("acme", 1), ("bob", 3)):
            with connect(address, creds[name]) as client:
                joined[name] = join(
                    client,
                    1,
                    root / f"work-{name}",
                    _train(creds[name], steps),
                    poll_s=0.1,
                    wait_s=5,
                )
        closed = advance(home, "f1")
        assert closed["state"] == "closed" and closed["members"] == {
            "acme": "received",
            "bob": "received",
            "carol": "straggler",
        }
        aggregate = open_adapter(round_dir(home, "f1", 0) / AGGREGATE)
        tokens = aggregate.manifest["training"]["federation"]["members"]
        assert tokens["bob"] == 3 * tokens["acme"]
        states = [
            load_file(str(root / f"work-{n}" / "round-0" / WEIGHTS_NAME)) for n in ("acme", "bob")
        ]
        expected = fedavg(states, [tokens["acme"], tokens["bob"]])
        got = load_file(str(aggregate.path / WEIGHTS_NAME))
        assert all(torch.equal(got[k], v) for k, v in expected.items())

        assert advance(home, "f1")["state"] == "issued"  # round 1 carries the aggregate
        with connect(address, creds["acme"]) as client:
            listed = client.list_bundles()
            round1 = open_bundle(
                client.fetch_bundle(listed[-1]["bundle_id"], root / "acme-r1").path
            )
            assert round1.manifest["federation"]["round"] == 1
            # a stale adapter (round 0's, submitted again) does not count for round 1
            client.submit_adapter(root / "work-acme" / "round-0")
        assert advance(home, "f1")["members"]["acme"] == "issued"
        emulator = round1.load_model()
        prefix, (pos, src) = (
            "model.layers",
            (round1.adapter_positions[0], round1.adapter_sources[0]),
        )
        torch.testing.assert_close(emulator.state_dict()[f"{prefix}.{pos}.mlp.up_proj.weight"],
                                   got[f"{prefix}.{src}.mlp.up_proj.weight"])  # fmt: skip
        for name in ("acme", "bob"):  # join resumes from work/join.json: round 0 is not redone
            with connect(address, creds[name]) as client:
                done = join(
                    client, 2, root / f"work-{name}", _train(creds[name], 1), poll_s=0.1, wait_s=5
                )
            assert [d["round"] for d in done] == [0, 1] and done[0] == joined[name][0]
            trained = [
                open_adapter(root / f"work-{name}" / f"round-{r}").manifest["training"]
                for r in (0, 1)
            ]
            assert [t["config"]["schedule_part"] for t in trained] == [
                [0, 2],
                [1, 2],
            ]  # one schedule
        final = advance(home, "f1")
    assert final["state"] == "finished" and final["round"] == 1
    assert advance(home, "f1")["state"] == "finished"
    merged = root / "merged"
    assert owner(["merge-adapter", "--model", str(root / "model"), "--adapter", final["aggregate"], "--bundle",
                  str(root / "base"), "--signer-key", str(home.root / "signing.pub"), "--out", str(merged)]) == 0  # fmt: skip
    assert json.loads((merged / "offsite_merge.json").read_text())["signer"] == "model-owner"


def test_deadline_closes_a_round_with_what_arrived(fed):
    home, creds, spec, root = fed
    advance(home, "f1")
    with thread_server(home) as address, connect(address, creds["carol"]) as client:
        join(client, 1, root / "work-carol", _train(creds["carol"], 1), poll_s=0.1, wait_s=5)
    assert advance(home, "f1")["state"] == "waiting"  # one of a quorum of two
    with home.registry() as registry:
        started = registry.federation("f1")["round_started"]
    late = advance(home, "f1", now=started + 601)
    assert late["state"] == "closed" and late["members"]["carol"] == "received"


def test_a_non_member_or_a_token_count_other_than_signed_does_not_count(fed):
    """dave (enrolled, not a member) submits acme's round adapter as his own; bob submits his with
    a larger token count than he signed: neither counts, so the round waits for a second member."""
    home, creds, spec, root = fed
    advance(home, "f1")
    with thread_server(home) as address:
        with connect(address, creds["acme"]) as client:
            join(client, 1, root / "work-acme", _train(creds["acme"], 1), poll_s=0.1, wait_s=5)
        theirs = _copy_tree(root / "work-acme" / "round-0", root / "dave-adapter")
        signer_of(creds["dave"]).sign(theirs / ADAPTER_MANIFEST, theirs / "adapter_manifest.sig")
        with (
            connect(address, creds["dave"]) as client,
            pytest.raises(TransportError, match="no bundle .* issued to dave"),
        ):
            client.submit_adapter(theirs)
        with connect(address, creds["bob"]) as client:
            listed = client.list_bundles()
            bundle = open_bundle(client.fetch_bundle(listed[-1]["bundle_id"], root / "bob-r0").path)
            adapter = _train(creds["bob"], 1)(bundle, root / "work-bob" / "round-0")
            manifest = json.loads((adapter / ADAPTER_MANIFEST).read_text())
            manifest["training"]["tokens_this_run"] *= 10  # not what bob signed
            (adapter / ADAPTER_MANIFEST).write_text(json.dumps(manifest))
            with pytest.raises(VerificationError, match="signature"):
                client.submit_adapter(adapter)
    state = advance(home, "f1")
    assert state["state"] == "waiting"
    assert state["members"] == {"acme": "received", "bob": "issued", "carol": "issued"}


def test_bad_federation_options_get_one_line_errors(fed, capsys):
    home, _, _, root = fed
    base = [
        "federate",
        "--home",
        str(home.root),
        "--bundle",
        str(root / "base"),
        "--model",
        str(root / "model"),
    ]
    expect_error(
        capsys,
        owner,
        [*base, "--name", "f2", "--members", "acme", "--rounds", "0"],
        "--rounds must be >= 1",
    )
    expect_error(
        capsys, owner, [*base, "--name", "f2", "--members", "acme,zed", "--rounds", "1"], "'zed'"
    )
    expect_error(
        capsys,
        owner,
        [*base, "--name", "f1", "--members", "acme", "--rounds", "1"],
        "exists with other settings",
    )
    expect_error(
        capsys, owner, [*base, "--name", "f2", "--members", "acme,acme", "--rounds", "1"], "once"
    )


def _claim(creds, adapter, raw_tokens: str):
    """The adapter's manifest claiming `raw_tokens` (JSON text), signed again by its data owner."""
    text = (adapter / ADAPTER_MANIFEST).read_text()
    manifest = json.loads(text)
    old = manifest["training"]["tokens_this_run"]
    (adapter / ADAPTER_MANIFEST).write_text(
        text.replace(f'"tokens_this_run": {old}', f'"tokens_this_run": {raw_tokens}')
    )
    signer_of(creds).sign(adapter / ADAPTER_MANIFEST, adapter / "adapter_manifest.sig")
    return adapter


def _round_bundle(client, root, name):
    listed = client.list_bundles()
    return open_bundle(client.fetch_bundle(listed[-1]["bundle_id"], root / f"{name}-r0").path)


@pytest.mark.parametrize("claim", ["0", "-5", '"abc"', "1e400", str(10**30), "true", "4.5"])
def test_an_unsound_token_claim_is_refused_at_arrival_and_the_round_goes_on(fed, claim):
    """A member's adapter claiming no, negative, non-integer or huge token counts is rejected when
    it arrives (recorded why); the round closes on the other members, and resuming works."""
    home, creds, spec, root = fed
    advance(home, "f1")
    with thread_server(home) as address:
        with connect(address, creds["bob"]) as client:
            bundle = _round_bundle(client, root, "bob")
            bad = _claim(
                creds["bob"],
                Path(_train(creds["bob"], 1)(bundle, root / "bob-bad" / "round-0")),
                claim,
            )
            with pytest.raises(VerificationError, match="tokens_this_run"):
                client.submit_adapter(bad)
        with home.registry() as registry:
            rejected = [a for a in registry.adapters() if a["data_owner"] == "bob"]
        assert rejected[0]["status"] == "rejected" and "tokens_this_run" in rejected[0]["reason"]
        assert advance(home, "f1")["members"]["bob"] == "issued"  # bob may still send a sound one
        for name in ("acme", "carol"):
            with connect(address, creds[name]) as client:
                join(client, 1, root / f"work-{name}", _train(creds[name], 1), poll_s=0.1, wait_s=5)
    closed = advance(home, "f1")
    assert closed["state"] == "closed" and closed["members"]["bob"] == "straggler"
    assert advance(home, "f1")["state"] == "issued"  # the next round is issued: nothing is poisoned


def test_token_weights_are_capped_by_the_smallest_claim(fed):
    """bob claims 10^12 tokens against acme's few: bob weighs max_weight_ratio (4) times acme."""
    home, creds, spec, root = fed
    advance(home, "f1")
    with thread_server(home) as address:
        with connect(address, creds["acme"]) as client:
            join(client, 1, root / "work-acme", _train(creds["acme"], 1), poll_s=0.1, wait_s=5)
        with connect(address, creds["bob"]) as client:
            bundle = _round_bundle(client, root, "bob")
            greedy = _claim(
                creds["bob"],
                Path(_train(creds["bob"], 1)(bundle, root / "work-bob" / "round-0")),
                str(10**12),
            )
            client.submit_adapter(greedy)
    closed = advance(home, "f1")
    assert closed["state"] == "closed"
    fed_record = open_adapter(round_dir(home, "f1", 0) / AGGREGATE).manifest["training"][
        "federation"
    ]
    acme = fed_record["members"]["acme"]
    assert fed_record["members"]["bob"] == 10**12 and fed_record["weights"] == {
        "acme": acme,
        "bob": 4 * acme,
    }
    states = [
        load_file(str(root / f"work-{n}" / "round-0" / WEIGHTS_NAME)) for n in ("acme", "bob")
    ]
    expected = fedavg(states, [1, 4])
    got = load_file(str(round_dir(home, "f1", 0) / AGGREGATE / WEIGHTS_NAME))
    assert all(torch.allclose(got[k].float(), v.float()) for k, v in expected.items())


def test_a_revoked_member_is_left_out_and_the_owner_can_resume_without_it(fed, capsys):
    """quorum = every member: carol is revoked mid-round, so the round closes on acme and bob;
    the next round is not issued to her; resuming with --members acme,bob is accepted, adding one is not."""
    home, creds, _, root = fed
    spec = FederationSpec(
        "f3", root / "base", str(root / "model"), ("acme", "bob", "carol"), rounds=2
    )
    start(home, spec)
    advance(home, "f3")
    with thread_server(home) as address:
        for name in ("acme", "bob"):
            with connect(address, creds[name]) as client:
                join(client, 1, root / f"w3-{name}", _train(creds[name], 1), poll_s=0.1, wait_s=5)
    assert advance(home, "f3")["state"] == "waiting"  # waits for carol
    assert owner(["revoke", "--home", str(home.root), "--name", "carol"]) == 0
    closed = advance(home, "f3")
    assert closed["state"] == "closed" and closed["members"]["carol"] == "revoked"
    assert set(advance(home, "f3")["members"]) == {"acme", "bob"}  # round 1 without carol
    base = ["federate", "--home", str(home.root), "--bundle", str(root / "base"), "--model", str(root / "model"),
            "--name", "f3", "--rounds", "2", "--once"]  # fmt: skip
    assert owner([*base, "--members", "acme,bob"]) == 0
    capsys.readouterr()
    expect_error(capsys, owner, [*base, "--members", "acme,bob,dave"], "may only leave members out")


def test_an_interrupted_join_round_resumes_with_resume(fed, monkeypatch, capsys):
    """Issue 24: `join` took --resume and --checkpoint-dir and dropped them, so a round interrupted
    after a checkpoint could never be continued. Now the round's own checkpoint carries on."""
    import data_owner.cli as cli
    from offsite_cli import progress
    from offsite_cli.progress import TrainingBar

    home, creds, _, root = fed
    advance(home, "f1")
    creds["acme"].save(root / "acme.creds")

    labels = []

    class Crash(TrainingBar):
        def __call__(self, info):
            labels.append(self.desc)  # the bar names the federation's round
            super().__call__(info)
            if info.step == 3:
                raise KeyboardInterrupt

    with thread_server(home) as address:
        argv = ["join", "--server", address, "--credentials", str(root / "acme.creds"), "--rounds", "1",
                "--data", str(root / "d.txt"), "--work", str(root / "w"), "--poll", "0.1", "--wait", "5",
                "--max-steps", "6", "--save-every", "2", "--block-size", "16", "--batch-size", "2",
                "--val-fraction", "0", "--checkpoint-dir", str(root / "ck")]  # fmt: skip
        monkeypatch.setattr(progress, "TrainingBar", Crash)
        assert cli.main(argv) == 130
        assert labels and labels[0].startswith("round 1/") and labels[0] != "round 1/"
        assert (root / "ck" / "round-0").is_dir() and not (root / "w" / "round-0").exists()
        monkeypatch.setattr(progress, "TrainingBar", TrainingBar)
        expect_error(capsys, cli.main, argv, "pass --resume")
        assert cli.main([*argv, "--resume"]) == 0
    training = open_adapter(root / "w" / "round-0").manifest["training"]
    assert training["steps"] == 6 and training["tokens_this_run"] == 4 * 2 * 16  # steps 3-6 only
    assert advance(home, "f1")["members"]["acme"] == "received"
