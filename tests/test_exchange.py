"""The two-party exchange over a real gRPC server with real mutual TLS on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import threading

import grpc
import pytest
import torch
from exchange_env import make_env, signer_of, thread_server, untrained_adapter
from helpers import rewrite_adapter as _rewrite_adapter
from safetensors.torch import load_file

from offsite.artefacts.adapter import ADAPTER_MANIFEST, WEIGHTS_NAME, open_adapter
from offsite.artefacts.bundle import MANIFEST_NAME, open_bundle
from offsite.atomic import sha256_file
from offsite.errors import VerificationError
from offsite.exchange.home import enroll, init_home
from offsite.exchange.protocol import PROTOCOL_VERSION
from offsite.training.config import TrainConfig
from offsite.training.finetune import FinetuneJob, finetune_bundle
from offsite.transport.client import RetryPolicy, TransportError, connect
from offsite.transport.v1 import offsite_pb2 as pb
from offsite.transport.v1 import offsite_pb2_grpc as pb_grpc
from owner.cli import main as owner

ONCE = RetryPolicy(attempts=1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("exchange")
    home, creds, bundles = make_env(root, ["acme", "bob"])
    with thread_server(home) as address:
        yield {"root": root, "home": home, "creds": creds, "bundles": bundles, "address": address}


def test_round_trip_fetch_finetune_submit_merge(env, tmp_path, corpus_file, capsys):
    acme = env["creds"]["acme"]
    with connect(env["address"], acme) as owner_client:
        assert owner_client.health()["identity"] == "acme"
        listed = owner_client.list_bundles()
        assert [b["bundle_id"] for b in listed] == [env["bundles"]["acme"].bundle_id]
        owner_client.fetch_bundle(listed[0]["bundle_id"], tmp_path / "bundle")
        for name in (tmp_path / "bundle").iterdir():
            assert sha256_file(name) == sha256_file(env["bundles"]["acme"].path / name.name)
        bundle = open_bundle(tmp_path / "bundle")
        job = FinetuneJob(corpus_file, tmp_path / "adapter", block_size=16, val_fraction=0.0)
        finetune_bundle(
            bundle,
            job,
            TrainConfig(max_steps=2, batch_size=2, learning_rate=1e-2),
            signer=signer_of(acme),
        )
        result = owner_client.submit_adapter(tmp_path / "adapter")
    assert result["status"] == "verified"

    capsys.readouterr()
    assert owner(["adapters", "--home", str(env["home"].root)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert any(
        r["adapter_id"] == result["adapter_id"]
        and r["data_owner"] == "acme"
        and r["status"] == "verified"
        for r in rows
    )
    assert (
        owner(
            [
                "merge-adapter",
                "--home",
                str(env["home"].root),
                "--adapter",
                result["adapter_id"][:12],
                "--out",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    trained = load_file(str(tmp_path / "adapter" / WEIGHTS_NAME))
    assert all(torch.equal(merged[k], v) for k, v in trained.items())


def _raw_stub(env, creds):
    tls = grpc.ssl_channel_credentials(
        creds.ca_cert.encode(), creds.client_key.encode(), creds.client_cert.encode()
    )
    channel = grpc.secure_channel(env["address"], tls)
    return channel, pb_grpc.OffsiteStub(channel)


def test_client_without_certificate_is_refused(env):
    tls = grpc.ssl_channel_credentials(
        env["creds"]["acme"].ca_cert.encode()
    )  # trusts the server, presents nothing
    with grpc.secure_channel(env["address"], tls) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.OffsiteStub(channel).ListBundles(
            pb.ListBundlesRequest(format_version=1), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certificate_from_another_ca_is_refused(env, tmp_path):
    stranger = enroll(init_home(tmp_path / "other", []), "acme")  # same name, wrong CA
    forged = stranger.__class__(**{**stranger.__dict__, "ca_cert": env["creds"]["acme"].ca_cert})
    with (
        connect(env["address"], forged, retry=ONCE) as client,
        pytest.raises(TransportError) as err,
    ):
        client.list_bundles()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_revoked_data_owner_is_refused(tmp_path):
    home, creds, _ = make_env(tmp_path, ["carol"])
    with thread_server(home) as address, connect(address, creds["carol"], retry=ONCE) as client:
        assert client.health()["identity"] == "carol"
        assert owner(["revoke", "--home", str(home.root), "--name", "carol"]) == 0
        with pytest.raises(TransportError) as err:
            client.list_bundles()
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in str(err.value)


def test_another_data_owners_bundle_is_not_served(env):
    bob_bundle = env["bundles"]["bob"].bundle_id
    channel, stub = _raw_stub(env, env["creds"]["acme"])
    with channel:
        listed = stub.ListBundles(pb.ListBundlesRequest(format_version=1)).bundles
        assert bob_bundle not in [b.bundle_id for b in listed]
        with pytest.raises(grpc.RpcError) as err:
            list(
                stub.Download(
                    pb.DownloadRequest(format_version=1, bundle_id=bob_bundle, file=MANIFEST_NAME)
                )
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            stub.BeginUpload(pb.BeginUploadRequest(format_version=1, bundle_id=bob_bundle))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_path_traversal_and_bad_chunks_are_rejected(env):
    acme_bundle = env["bundles"]["acme"].bundle_id
    channel, stub = _raw_stub(env, env["creds"]["acme"])
    with channel:
        with pytest.raises(grpc.RpcError) as err:
            list(
                stub.Download(
                    pb.DownloadRequest(format_version=1, bundle_id=acme_bundle, file="../x")
                )
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        files = [
            pb.FileInfo(name=n, size=10, sha256="0" * 64)
            for n in ("../x", ADAPTER_MANIFEST, "adapter_manifest.sig")
        ]
        with pytest.raises(grpc.RpcError) as err:
            stub.BeginUpload(
                pb.BeginUploadRequest(format_version=1, bundle_id=acme_bundle, files=files)
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        names = (WEIGHTS_NAME, ADAPTER_MANIFEST, "adapter_manifest.sig")
        status = stub.BeginUpload(pb.BeginUploadRequest(format_version=1, bundle_id=acme_bundle,
                                                        files=[pb.FileInfo(name=n, size=1 << 20, sha256="0" * 64) for n in names[:1]]
                                                        + [pb.FileInfo(name=n, size=100, sha256="0" * 64) for n in names[1:]]))  # fmt: skip
        cases = [  # (chunk, what the server must say)
            (pb.WriteRequest(format_version=1, upload_id=status.upload_id, file=WEIGHTS_NAME, offset=0, data=b"x" * (2 << 20)), "larger than"),
            (pb.WriteRequest(format_version=1, upload_id=status.upload_id, file=WEIGHTS_NAME, offset=5, data=b"x"), "resume from 0"),
            (pb.WriteRequest(format_version=1, upload_id=status.upload_id, file="../x", offset=0, data=b"x"), "not part of upload"),
            (pb.WriteRequest(format_version=9, upload_id=status.upload_id, file=WEIGHTS_NAME, offset=0, data=b"x"), "format_version 9"),
        ]  # fmt: skip
        for chunk, message in cases:
            with pytest.raises(grpc.RpcError) as err:
                stub.Write(iter([chunk]))
            assert (
                err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                and message in err.value.details()
            )
    assert not list((env["home"].uploads / status.upload_id).glob("*.part")), "nothing written"


def test_client_refuses_unsafe_names_in_a_listing(env, tmp_path, monkeypatch):
    with connect(env["address"], env["creds"]["acme"]) as client:
        real = client.list_bundles()
        evil = [{**real[0], "files": [{"name": "../x", "size": 1, "sha256": "0" * 64}]}]
        monkeypatch.setattr(client, "list_bundles", lambda: evil)
        with pytest.raises(VerificationError, match="unsafe file name"):
            client.fetch_bundle(real[0]["bundle_id"], tmp_path / "b")
    assert not (tmp_path / "x").exists() and not (tmp_path / "b").exists()


def test_truncated_or_tampered_bundle_files_never_land(env, tmp_path):
    src = env["bundles"]["acme"].path
    backup = tmp_path / "backup"
    shutil.copytree(src, backup)
    try:
        with open(src / "config.json", "r+b") as f:
            f.truncate(10)
        with (
            connect(env["address"], env["creds"]["acme"]) as client,
            pytest.raises(VerificationError, match="do not match"),
        ):
            client.fetch_bundle(env["bundles"]["acme"].bundle_id, tmp_path / "b")
    finally:
        shutil.rmtree(src)
        shutil.copytree(backup, src)
    assert not (tmp_path / "b").exists()
    assert not (tmp_path / "b.partial" / "config.json").exists()


def _resign(bundle_dir, key_signer):
    key_signer.sign(bundle_dir / MANIFEST_NAME, bundle_dir / "offsite_manifest.sig")


def test_tampered_manifest_and_wrong_signature_are_rejected(env, tmp_path, capsys):
    from data_owner.cli import main as data_owner

    creds_path = tmp_path / "acme.creds"
    env["creds"]["acme"].save(creds_path)
    bundle = tmp_path / "b"
    shutil.copytree(env["bundles"]["acme"].path, bundle)
    args = [
        "evaluate",
        "--bundle",
        str(bundle),
        "--credentials",
        str(creds_path),
        "--data",
        "x.txt",
    ]

    manifest = json.loads((bundle / MANIFEST_NAME).read_text())
    (bundle / MANIFEST_NAME).write_text(json.dumps({**manifest, "issued_to": "mallory"}))
    capsys.readouterr()
    assert data_owner(args) == 2
    assert "signature does not match" in capsys.readouterr().err

    _resign(bundle, signer_of(env["creds"]["bob"]))  # a valid signature, by the wrong key
    assert data_owner(args) == 2
    assert "not the expected" in capsys.readouterr().err

    shutil.rmtree(bundle)
    shutil.copytree(env["bundles"]["acme"].path, bundle)
    weights = bundle / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    assert data_owner(args) == 2
    assert "model.safetensors: sha256 does not match" in capsys.readouterr().err


def _tamper_adapter(path, mutate, creds):
    _rewrite_adapter(path, mutate)
    signer_of(creds).sign(path / ADAPTER_MANIFEST, path / "adapter_manifest.sig")


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda t: t.pop(sorted(t)[0]), "missing tensors"),
        (lambda t: t.__setitem__(sorted(t)[0], torch.zeros(2, 2)), "has shape [2, 2]"),
        (
            lambda t: t.__setitem__(sorted(t)[0], torch.full_like(t[sorted(t)[0]], float("nan"))),
            "NaN or Inf",
        ),
    ],
)
def test_bad_adapters_are_rejected_and_recorded(env, tmp_path, mutate, reason):
    acme = env["creds"]["acme"]
    adapter = untrained_adapter(env["bundles"]["acme"], acme, tmp_path / "a")
    _tamper_adapter(adapter, mutate, acme)
    with (
        connect(env["address"], acme) as client,
        pytest.raises(
            VerificationError, match="rejected the adapter: .*" + reason.replace("[", r"\[")
        ),
    ):
        client.submit_adapter(adapter)
    with env["home"].registry() as registry:
        rejected = [
            r
            for r in registry.adapters()
            if r["status"] == "rejected" and reason.split(" [")[0] in r["reason"]
        ]
    assert rejected and not any((env["home"].adapters / r["adapter_id"]).exists() for r in rejected)


def test_adapter_signed_by_someone_else_is_rejected(env, tmp_path):
    acme = env["creds"]["acme"]
    adapter = untrained_adapter(env["bundles"]["acme"], acme, tmp_path / "a")
    signer_of(env["creds"]["bob"]).sign(
        adapter / ADAPTER_MANIFEST, adapter / "adapter_manifest.sig"
    )
    with (
        connect(env["address"], acme) as client,
        pytest.raises(VerificationError, match="not the expected"),
    ):
        client.submit_adapter(adapter)


def test_many_data_owners_at_once(tmp_path):
    names = [f"owner{i}" for i in range(8)]
    home, creds, bundles = make_env(tmp_path, names)
    errors, results = [], {}

    def one(name):
        try:
            with connect(address, creds[name]) as client:
                listed = client.list_bundles()
                assert [b["bundle_id"] for b in listed] == [bundles[name].bundle_id]
                client.fetch_bundle(listed[0]["bundle_id"], tmp_path / f"got-{name}")
                adapter = untrained_adapter(
                    open_bundle(tmp_path / f"got-{name}"), creds[name], tmp_path / f"a-{name}"
                )
                results[name] = client.submit_adapter(adapter)
        except Exception as e:  # collected and reported below
            errors.append((name, repr(e)))

    with thread_server(home) as address:
        threads = [threading.Thread(target=one, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert not errors, errors
    assert all(r["status"] == "verified" for r in results.values()) and len(results) == 8
    with home.registry() as registry:
        owners = {r["adapter_id"]: r["data_owner"] for r in registry.adapters()}
    assert sorted(owners.values()) == sorted(names)
    for name in names:
        assert open_adapter(tmp_path / f"a-{name}").manifest["bundle_id"] == bundles[name].bundle_id


def test_protocol_version_is_checked(env):
    channel, stub = _raw_stub(env, env["creds"]["acme"])
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.ListBundles(pb.ListBundlesRequest(format_version=PROTOCOL_VERSION + 1))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_peft_adapter_round_trip_and_a_forged_config_is_rejected(env, tmp_path, corpus_file):
    from offsite.artefacts.adapter import PEFT_CONFIG, PEFT_WEIGHTS
    from offsite.artefacts.peft_delta import PeftOptions

    acme = env["creds"]["acme"]
    bundle = env["bundles"]["acme"]
    job = FinetuneJob(corpus_file, tmp_path / "lora", block_size=16, val_fraction=0.0,
                      peft=PeftOptions("lora", rank=2))  # fmt: skip
    finetune_bundle(bundle, job, TrainConfig(max_steps=2, batch_size=2, learning_rate=1e-2),
                    signer=signer_of(acme))  # fmt: skip
    blocks = untrained_adapter(bundle, acme, tmp_path / "blocks")
    size = lambda d: sum(p.stat().st_size for p in d.iterdir())  # noqa: E731
    assert size(tmp_path / "lora") < size(blocks) / 3, "a rank-2 delta is far smaller on the wire"
    with connect(env["address"], acme) as client:
        result = client.submit_adapter(tmp_path / "lora")
        assert result["status"] == "verified"
        merged = tmp_path / "merged"
        assert owner(["merge-adapter", "--home", str(env["home"].root), "--adapter",
                      result["adapter_id"][:12], "--out", str(merged)]) == 0  # fmt: skip
        assert json.loads((merged / "offsite_merge.json").read_text())["peft"]["method"] == "lora"
        config = json.loads((tmp_path / "lora" / PEFT_CONFIG).read_text())
        config["target_modules"] = config["target_modules"].replace("(0|1|6|7)", r"(\d+)")
        (tmp_path / "lora" / PEFT_CONFIG).write_text(json.dumps(config))
        manifest = json.loads((tmp_path / "lora" / ADAPTER_MANIFEST).read_text())
        manifest["files"][PEFT_CONFIG] = sha256_file(tmp_path / "lora" / PEFT_CONFIG)
        (tmp_path / "lora" / ADAPTER_MANIFEST).write_text(json.dumps(manifest))
        signer_of(acme).sign(
            tmp_path / "lora" / ADAPTER_MANIFEST, tmp_path / "lora" / "adapter_manifest.sig"
        )
        with pytest.raises(VerificationError, match="rejected the adapter: .*target_modules"):
            client.submit_adapter(tmp_path / "lora")
    assert (tmp_path / "lora" / PEFT_WEIGHTS).is_file()
