"""Regression tests for the second adversarial review (issue 26): each failed before its fix."""

from __future__ import annotations

import errno
import json
import os
import shutil
import time

import pytest
from exchange_env import make_env, signer_of, thread_server, untrained_adapter
from helpers import expect_error
from tiny import CORPUS

from data_owner.cli import build_parser as data_owner_parser
from data_owner.cli import main as data_owner
from offsite.artefacts.adapter import (
    ADAPTER_MANIFEST,
    ADAPTER_SIGNATURE,
    WEIGHTS_NAME,
    extract_adapter,
    open_adapter,
    save_adapter,
)
from offsite.artefacts.merge import MERGE_RECORD
from offsite.atomic import atomic_directory, sha256_file
from offsite.errors import VerificationError
from offsite.exchange.credentials import load_credentials
from offsite.exchange.home import open_home
from offsite.exchange.protocol import Busy, Unauthenticated
from offsite.exchange.service import OwnerService, ServiceLimits
from offsite.transport.client import RetryPolicy, TransportError, connect
from offsite_cli.paths import INPUTS, NOT_PATHS, OUTPUTS
from offsite_cli.runner import make_parser, run, subparsers
from owner.cli import build_parser as owner_parser
from owner.cli import main as owner


def _snapshot(folder):
    return {
        str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture
def env(tmp_path):
    home, creds, bundles = make_env(tmp_path, ["alice"])
    creds["alice"].save(tmp_path / "alice.creds")
    (tmp_path / "d.txt").write_text(CORPUS)
    adapter = untrained_adapter(bundles["alice"], creds["alice"], tmp_path / "adapter")
    return home, tmp_path, bundles["alice"], adapter


# 2. no output onto an input, whatever --overwrite says
def test_no_command_writes_over_the_owner_home_or_another_input(env, capsys):
    home, root, bundle, adapter = env
    h, model = str(home.root), str(root / "model")
    before = {
        "home": _snapshot(home.root),
        "bundle": _snapshot(bundle.path),
        "model": _snapshot(root / "model"),
    }
    expect_error(capsys, owner, ["merge-adapter", "--home", h, "--model", model, "--adapter", str(adapter),
                                 "--out", h, "--overwrite"], "overlaps --home")  # fmt: skip
    expect_error(capsys, owner, ["package-emulator", "--home", h, "--for", "alice", "--model", model,
                                 "--out", h, "--overwrite"], "overlaps --home")  # fmt: skip
    expect_error(capsys, owner, ["package-emulator", "--home", h, "--for", "alice", "--model", model,
                                 "--out", str(home.root / "bundles" / "x")], "overlaps --home")  # fmt: skip
    for out in (bundle.path, root / "model"):
        expect_error(capsys, owner, ["evaluate-offsite", "--model", model, "--bundle", str(bundle.path),
                                     "--train", str(root / "d.txt"), "--test", str(root / "d.txt"),
                                     "--out", str(out), "--overwrite"], "overlaps")  # fmt: skip
    (root / "w").mkdir()
    (root / "w" / "alice.creds").write_bytes((root / "alice.creds").read_bytes())
    expect_error(capsys, data_owner, ["finetune", "--bundle", str(bundle.path), "--credentials", str(root / "w" / "alice.creds"),
                                      "--data", str(root / "d.txt"), "--out", str(root / "w"), "--overwrite"],
                 "contains --credentials")  # fmt: skip
    assert (root / "w" / "alice.creds").is_file()
    after = {
        "home": _snapshot(home.root),
        "bundle": _snapshot(bundle.path),
        "model": _snapshot(root / "model"),
    }
    assert after == before
    assert (root / "alice.creds").is_file()


def _commands(parser):
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices.items()


@pytest.mark.parametrize("parser", [owner_parser, data_owner_parser], ids=["owner", "data-owner"])
def test_every_string_argument_is_known_as_input_output_or_not_a_path(parser):
    """A new path argument must be given a role, or the overlap check would not see it."""
    for name, p in _commands(parser()):
        for action in p._actions:
            if (
                action.dest in ("help", "verbose")
                or action.nargs == 0
                or action.type not in (None, str)
            ):
                continue
            assert action.dest in {**OUTPUTS, **INPUTS} or action.dest in NOT_PATHS, (
                f"{name} {action.dest}"
            )


# 4. enroll writes the credentials first: a bad --out leaves no enrolled name behind
def test_enroll_to_a_missing_folder_enrolls_nobody(env, capsys):
    home, root, _, _ = env
    expect_error(capsys, owner, ["enroll", "--home", str(home.root), "--name", "bob", "--out", str(root / "no" / "bob.creds")],
                 "no such directory")  # fmt: skip
    with open_home(home.root).registry() as registry:
        assert registry.data_owner("bob") is None
    assert (
        owner(
            ["enroll", "--home", str(home.root), "--name", "bob", "--out", str(root / "bob.creds")]
        )
        == 0
    )
    assert json.loads((root / "bob.creds").read_text())["name"] == "bob"


# 5. a revoked data owner's adapter is merged only knowingly, and the record says so
def test_merging_a_revoked_signers_adapter_needs_allow_revoked(env, capsys):
    home, root, bundle, adapter = env
    h, model = str(home.root), str(root / "model")
    with thread_server(home) as address, connect(address, _creds(root)) as client:
        adapter_id = client.submit_adapter(adapter)["adapter_id"]
    assert owner(["revoke", "--home", h, "--name", "alice"]) == 0
    argv = [
        "merge-adapter",
        "--home",
        h,
        "--model",
        model,
        "--adapter",
        adapter_id,
        "--out",
        str(root / "m"),
    ]
    expect_error(capsys, owner, argv, "--allow-revoked", root / "m")
    expect_error(capsys, owner, ["merge-adapter", "--home", h, "--model", model, "--adapter", str(adapter),
                                 "--out", str(root / "m")], "revoked", root / "m")  # fmt: skip
    assert owner([*argv, "--allow-revoked"]) == 0
    record = json.loads((root / "m" / MERGE_RECORD).read_text())
    assert record["signer"] == "alice" and record["signer_revoked_at"]
    assert "revoked" in record["verified"]["signer_standing"]


def _creds(root):
    return load_credentials(root / "alice.creds")


def _adapter_variant(bundle, creds, out, i, signed=True):
    """A distinct adapter (its training record differs) from the bundle's own blocks."""
    state = extract_adapter(bundle.load_model(), bundle)
    return save_adapter(
        state, bundle, out, training={"variant": i}, signer=signer_of(creds) if signed else None
    ).path


# 6. a per-identity quota on stored adapters
def test_one_identity_cannot_store_adapters_without_limit(env, tmp_path):
    home, root, bundle, _ = env
    limits = ServiceLimits(max_stored_adapters=2)
    with (
        thread_server(home, limits=limits) as address,
        connect(address, _creds(root), retry=RetryPolicy(attempts=1)) as client,
    ):
        for i in range(2):
            assert (
                client.submit_adapter(
                    _adapter_variant(bundle, _creds(root), tmp_path / f"v{i}", i)
                )["status"]
                == "verified"
            )
        with pytest.raises(TransportError, match="2 adapters stored"):
            client.submit_adapter(_adapter_variant(bundle, _creds(root), tmp_path / "v2", 2))


# 8. a revoked identity's running streams stop
def test_revocation_stops_a_running_download_and_upload(env, tmp_path):
    home, root, bundle, adapter = env
    service = OwnerService(home, chunk_bytes=1024, limits=ServiceLimits(recheck_s=0.01))
    try:
        name = max(bundle.manifest["files"], key=lambda n: (bundle.path / n).stat().st_size)
        chunks = service.read_file("alice", bundle.bundle_id, name, 0)
        next(chunks)
        with home.registry() as registry:
            registry.revoke("alice")
        time.sleep(0.05)
        with pytest.raises(Unauthenticated, match="revoked"):
            for _ in chunks:
                time.sleep(0.02)
    finally:
        service.close()


def test_revocation_stops_a_running_upload(tmp_path):
    home, _, bundles = make_env(tmp_path, ["alice"])
    service = OwnerService(home, limits=ServiceLimits(recheck_s=0.01))
    try:
        files = [
            {"name": n, "size": 4096, "sha256": "0" * 64}
            for n in (WEIGHTS_NAME, ADAPTER_MANIFEST, ADAPTER_SIGNATURE)
        ]
        upload = service.begin_upload("alice", bundles["alice"].bundle_id, files)["upload_id"]

        def chunks():
            for i in range(64):
                if i == 2:
                    with home.registry() as registry:
                        registry.revoke("alice")
                time.sleep(0.02)
                yield WEIGHTS_NAME, 64 * i, b"x" * 64

        with pytest.raises(Unauthenticated, match="revoked"):
            service.write("alice", upload, chunks())
        assert (home.uploads / upload / f"{WEIGHTS_NAME}.part").stat().st_size < 64 * 8
    finally:
        service.close()


# 9. no cross-identity interference, no server paths in errors, cleanup tells the truth,
#    regular files only, killed writers' leftovers removed, disk space checked up front
def test_another_identitys_begin_upload_leaves_a_fresh_staging_folder_alone(tmp_path):
    home, creds, bundles = make_env(tmp_path, ["alice", "bob"])
    service = OwnerService(home)
    try:
        (home.uploads / "abc123").mkdir()  # alice's upload between its record and its first write
        files = [
            {"name": n, "size": 10, "sha256": "0" * 64}
            for n in (WEIGHTS_NAME, ADAPTER_MANIFEST, ADAPTER_SIGNATURE)
        ]
        service.begin_upload("bob", bundles["bob"].bundle_id, files)
        assert (home.uploads / "abc123").is_dir()
        upload = service.begin_upload("alice", bundles["alice"].bundle_id, files)["upload_id"]
        shutil.rmtree(home.uploads / upload)  # its folder is gone (e.g. the disk was cleaned)
        with pytest.raises(Busy) as err:
            service.write("alice", upload, iter([(WEIGHTS_NAME, 0, b"x")]))
        assert str(home.root) not in str(err.value)
    finally:
        service.close()


def test_a_fifo_in_an_adapter_is_refused_not_waited_on(env, tmp_path):
    _, _, _, adapter = env
    fake = tmp_path / "fifo-adapter"
    shutil.copytree(adapter, fake)
    (fake / WEIGHTS_NAME).unlink()
    os.mkfifo(fake / WEIGHTS_NAME)
    with pytest.raises(VerificationError, match="not a regular file"):
        open_adapter(fake)


def test_a_killed_writers_partial_folder_is_removed_by_the_next_write(tmp_path):
    dead = tmp_path / ".out.999999999.partial"
    live = tmp_path / f".out.{os.getpid()}.keep.partial"
    dead.mkdir(), live.mkdir()
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert not dead.exists() and live.exists() and (tmp_path / "out" / "f").is_file()


def test_too_little_disk_space_fails_before_training(env, monkeypatch, capsys):
    _, root, bundle, _ = env
    monkeypatch.setattr(
        shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1000)
    )
    expect_error(capsys, data_owner, ["finetune", "--bundle", str(bundle.path), "--data", str(root / "d.txt"),
                                      "--out", str(root / "a2"), "--max-steps", "1", "--block-size", "16"],
                 "MiB free", root / "a2")  # fmt: skip


def test_an_os_error_is_one_line_not_a_traceback(capsys):
    parser = make_parser("x", "test")
    sub = subparsers(parser)

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out")

    sub.add_parser("go").set_defaults(func=full)
    assert run(parser, ["go"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "No space left on device: /data/out" in err


FINETUNE = ["finetune", "--bundle", "{bundle}", "--data", "{t}/d.txt", "--out", "{t}/o"]
FEDERATE = [
    "federate",
    "--home",
    "{home}",
    "--name",
    "f",
    "--bundle",
    "{bundle}",
    "--members",
    "alice",
    "--rounds",
    "1",
]


# 10. CLI values: one line and exit 2, never a traceback or a silent wrong answer
@pytest.mark.parametrize(
    "which, argv, message",
    [
        ("owner", ["sample-corpus", "--out", "{t}/c.txt", "--temperature", "nan"], "--temperature"),
        ("owner", ["serve", "--home", "{home}", "--listen", "garbage"], "--listen"),
        ("owner", ["serve", "--home", "{home}", "--listen", "127.0.0.1:99999"], "--listen"),
        ("owner", ["init", "--home", "/proc/x"], "--home"),
        (
            "owner",
            ["evaluate", "--model", "{t}/model", "--data", "{t}/d.txt", "--max-sequences", "-1"],
            "--max-sequences",
        ),
        ("owner", [*FEDERATE, "--deadline", "nan"], "--deadline"),
        ("owner", [*FEDERATE, "--poll", "-1"], "--poll"),  # fmt: skip
        ("data-owner", [*FINETUNE, "--seed", str(10**23)], "--seed"),
        ("data-owner", [*FINETUNE, "--dp-epsilon", "inf"], "--dp-epsilon"),
        (
            "data-owner",
            [
                "join",
                "--server",
                "localhost:1",
                "--credentials",
                "{t}/alice.creds",
                "--data",
                "{t}/d.txt",
                "--work",
                "{t}/w",
                "--rounds",
                "-1",
            ],
            "--rounds",
        ),  # fmt: skip
        (
            "data-owner",
            ["evaluate", "--bundle", "{bundle}", "--data", "{t}/d.txt", "--max-sequences", "0"],
            "--max-sequences",
        ),
    ],
)
def test_bad_cli_values_are_one_line_errors(env, which, argv, message, capsys):
    home, root, bundle, _ = env
    fill = {"t": str(root), "home": str(home.root), "bundle": str(bundle.path)}
    fn = owner if which == "owner" else data_owner
    expect_error(capsys, fn, [a.format(**fill) for a in argv], message)
    assert not (root / "o").exists()


# 11. the merge record names the signer the registry vouched for
def test_an_adapter_signed_after_it_was_made_records_its_signer(env, tmp_path):
    home, root, bundle, _ = env
    late = _adapter_variant(bundle, _creds(root), tmp_path / "late", 7, signed=False)
    signer_of(_creds(root)).sign(late / ADAPTER_MANIFEST, late / ADAPTER_SIGNATURE)
    with thread_server(home) as address, connect(address, _creds(root)) as client:
        adapter_id = client.submit_adapter(late)["adapter_id"]
    assert owner(["merge-adapter", "--home", str(home.root), "--model", str(root / "model"),
                  "--adapter", adapter_id, "--out", str(tmp_path / "m")]) == 0  # fmt: skip
    assert json.loads((tmp_path / "m" / MERGE_RECORD).read_text())["signer"] == "alice"
