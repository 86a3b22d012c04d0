"""Regression tests for the adversarial review (issue 11), the owner's server: registry, caps, staging."""

from __future__ import annotations

import json
import shutil
import threading
import time

import grpc
import pytest
from exchange_env import make_env, thread_server, untrained_adapter
from helpers import expect_error
from tiny import CORPUS

from data_owner.cli import main as data_owner
from offsite.artefacts.adapter import (
    ADAPTER_MANIFEST,
    ADAPTER_SIGNATURE,
    WEIGHTS_NAME,
)
from offsite.errors import OffsiteError
from offsite.exchange.protocol import PROTOCOL_VERSION, Busy
from offsite.exchange.service import OwnerService, ServiceLimits
from offsite.transport.client import RetryPolicy, connect
from offsite.transport.v1 import offsite_pb2 as pb
from offsite.transport.v1 import offsite_pb2_grpc as pb_grpc
from owner.cli import main as owner

TRAIN = ["--max-steps", "2", "--block-size", "16", "--batch-size", "2", "--learning-rate", "1e-2"]


# 3, 4, 5: the server's registry, caps and staging
@pytest.fixture
def env(tmp_path):
    home, creds, bundles = make_env(tmp_path, ["acme", "bob"])
    return {"root": tmp_path, "home": home, "creds": creds, "bundles": bundles}


def test_a_verified_record_is_never_replaced(env, tmp_path):
    acme, bob = env["creds"]["acme"], env["creds"]["bob"]
    adapter = untrained_adapter(env["bundles"]["acme"], acme, tmp_path / "a")
    with thread_server(env["home"]) as address:
        with connect(address, acme) as client:
            first = client.submit_adapter(adapter)
        with (
            connect(address, bob, retry=RetryPolicy(attempts=1)) as client,
            pytest.raises(OffsiteError),
        ):
            client.submit_adapter(
                adapter
            )  # bob uploads acme's adapter (a bundle not issued to him)
    with env["home"].registry() as registry:
        record = registry.adapter(first["adapter_id"])
    assert record["status"] == "verified" and record["data_owner"] == "acme"


def test_one_data_owner_cannot_starve_another(env):
    limits = ServiceLimits(max_calls=8, max_calls_per_identity=3, idle_stream_s=8.0)
    channels, streams = [], []
    with thread_server(env["home"], limits=limits) as address:
        acme = env["creds"]["acme"]
        for _ in range(6):  # idle Write streams that never send a message
            channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(
                acme.ca_cert.encode(), acme.client_key.encode(), acme.client_cert.encode()))  # fmt: skip
            blocker = threading.Event()

            def idle(b=blocker):
                b.wait(12)
                return
                yield  # noqa: B901 - a generator that sends nothing

            streams.append(pb_grpc.OffsiteStub(channel).Write.future(idle()))
            channels.append((channel, blocker))
        time.sleep(0.5)
        start = time.perf_counter()
        with connect(address, env["creds"]["bob"], retry=RetryPolicy(attempts=1)) as client:
            for _ in range(5):
                assert client.health()["identity"] == "bob"
        # well before any idle stream is cancelled (8 s): the per-identity cap, not the timeout, kept room
        assert time.perf_counter() - start < 6, "bob's calls must not wait for acme's idle streams"
        codes = set()
        for future in streams:
            with pytest.raises(grpc.RpcError) as err:
                future.result(timeout=30)
            codes.add(err.value.code())
        # at most 3 got a worker (cancelled when idle), the rest were refused at once
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and grpc.StatusCode.CANCELLED in codes
        for channel, blocker in channels:
            blocker.set()
            channel.close()


def test_staging_quota_expiry_and_committed_uploads(env, tmp_path):
    service = OwnerService(env["home"], limits=ServiceLimits(max_open_uploads=2, upload_ttl_s=60))
    bundle_id = env["bundles"]["acme"].bundle_id

    def begin(i):
        files = [
            {"name": n, "size": 10 + i, "sha256": "0" * 64}
            for n in (WEIGHTS_NAME, ADAPTER_MANIFEST, ADAPTER_SIGNATURE)
        ]
        return service.begin_upload("acme", bundle_id, files)["upload_id"]

    first, _ = begin(0), begin(1)
    with pytest.raises(Busy, match="2 open uploads"):
        begin(2)
    assert begin(0) == first, "resuming an upload is not a new one"
    expired = service.expire_uploads(now=time.time() + 3600)
    assert len(expired) == 2 and not any(env["home"].uploads.iterdir())
    begin(2)
    service.close()


def test_write_to_a_committed_upload_is_a_clean_refusal(env, tmp_path):
    acme = env["creds"]["acme"]
    adapter = untrained_adapter(env["bundles"]["acme"], acme, tmp_path / "a")
    with thread_server(env["home"]) as address:
        with connect(address, acme) as client:
            client.submit_adapter(adapter)
        with env["home"].registry() as registry:
            upload_id = registry.uploads_in_state("committed")[0]["upload_id"]
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(
            acme.ca_cert.encode(), acme.client_key.encode(), acme.client_cert.encode()))  # fmt: skip
        with channel, pytest.raises(grpc.RpcError) as err:
            pb_grpc.OffsiteStub(channel).Write(iter([pb.WriteRequest(
                format_version=PROTOCOL_VERSION, upload_id=upload_id, file=WEIGHTS_NAME, offset=0, data=b"x")]))  # fmt: skip
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "committed" in err.value.details() and str(env["home"].root) not in err.value.details()
    assert not (env["home"].uploads / upload_id).exists()


# 6. a reused download folder is checked like a fresh download
def test_reused_bundle_folder_is_verified(env, tmp_path, capsys):
    creds = tmp_path / "acme.creds"
    env["creds"]["acme"].save(creds)
    fake = tmp_path / "out.bundle"
    shutil.copytree(env["bundles"]["bob"].path, fake)  # hashes fine, signed, but issued to bob
    (tmp_path / "c.txt").write_text(CORPUS)
    expect_error(capsys, data_owner, ["finetune", "--server", "localhost:1", "--credentials", str(creds), "--data",
                                      str(tmp_path / "c.txt"), "--out", str(tmp_path / "out"), *TRAIN],
                 "issued to 'bob', not to 'acme'", tmp_path / "out")  # fmt: skip
    expect_error(capsys, data_owner, ["finetune", "--bundle", str(fake), "--credentials", str(creds), "--data",
                                      str(tmp_path / "c.txt"), "--out", str(tmp_path / "out"), *TRAIN],
                 "issued to 'bob', not to 'acme'", tmp_path / "out")  # fmt: skip


def test_cleanup_command_expires_nothing_fresh(tmp_path, capsys):
    home, _, _ = make_env(tmp_path, ["acme"])
    (home.uploads / "leftover").mkdir()
    capsys.readouterr()
    assert owner(["cleanup", "--home", str(home.root)]) == 0
    # issue 26: it said [] while it removed the stray folder; now it says so
    assert json.loads(capsys.readouterr().out) == {
        "expired_uploads": [],
        "removed_folders": ["leftover"],
    }
    assert not (home.uploads / "leftover").exists()
