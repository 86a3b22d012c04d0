"""The README's exchange commands, end to end through the CLIs, and their bad-input errors."""

from __future__ import annotations

import json

import pytest
from exchange_env import thread_server
from helpers import expect_error as _expect_error
from tiny import CORPUS, save_tiny

from data_owner.cli import main as data_owner
from offsite.exchange.home import open_home
from owner.cli import main as owner


def _json(capsys, fn, argv):
    capsys.readouterr()
    assert fn(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_owner_and_data_owner_commands(tmp_path, capsys):
    home, model = str(tmp_path / "home"), str(tmp_path / "model")
    save_tiny("llama", tmp_path / "model")
    (tmp_path / "my.txt").write_text(CORPUS)
    _json(capsys, owner, ["init", "--home", home, "--server-name", "owner.example"])
    _json(
        capsys,
        owner,
        ["enroll", "--home", home, "--name", "acme", "--out", str(tmp_path / "acme.creds")],
    )
    assert oct((tmp_path / "acme.creds").stat().st_mode & 0o777) == "0o600"
    packaged = _json(capsys, owner, ["package-emulator", "--model", model, "--home", home, "--for", "acme",
                                     "--out", str(tmp_path / "bundle"), "--emulator-layers", "2"])  # fmt: skip
    assert (
        packaged["issued_to"] == "acme" and (tmp_path / "bundle" / "offsite_manifest.sig").is_file()
    )

    with thread_server(open_home(home)) as address:
        server = ["--server", address, "--credentials", str(tmp_path / "acme.creds")]
        done = _json(capsys, data_owner, ["finetune", *server, "--data", str(tmp_path / "my.txt"), "--out", str(tmp_path / "adapter"),
                                          "--max-steps", "2", "--block-size", "16", "--batch-size", "2"])  # fmt: skip
        assert done["submitted"]["status"] == "verified"
        assert (
            json.loads((tmp_path / "adapter" / "adapter_manifest.json").read_text())["signer"]
            == "acme"
        )
        fetched = _json(capsys, data_owner, ["fetch", *server, "--out", str(tmp_path / "again")])
        assert fetched["bundle_id"] == packaged["bundle_id"]
        again = _json(
            capsys, data_owner, ["submit", *server, "--adapter", str(tmp_path / "adapter")]
        )
        assert again["adapter_id"] == done["submitted"]["adapter_id"], "re-submitting is idempotent"
        _json(capsys, data_owner, ["evaluate", "--bundle", str(tmp_path / "again"), "--credentials", str(tmp_path / "acme.creds"),
                                   "--adapter", str(tmp_path / "adapter"), "--data", str(tmp_path / "my.txt"), "--block-size", "32"])  # fmt: skip

    rows = _json(capsys, owner, ["adapters", "--home", home])
    assert [r["status"] for r in rows] == ["verified"]
    merged = _json(
        capsys,
        owner,
        [
            "merge-adapter",
            "--home",
            home,
            "--adapter",
            rows[0]["adapter_id"],
            "--out",
            str(tmp_path / "merged"),
        ],
    )
    assert merged["signer"] == "acme" and (tmp_path / "merged" / "config.json").is_file()
    _json(capsys, owner, ["revoke", "--home", home, "--name", "acme"])


def test_exchange_bad_input(tmp_path, capsys):
    home = str(tmp_path / "home")
    assert owner(["init", "--home", home]) == 0
    _expect_error(capsys, owner, ["init", "--home", home], "already an owner home")
    _expect_error(capsys, owner, ["enroll", "--home", home, "--name", "../evil", "--out", str(tmp_path / "e.creds")],
                  "use letters, digits", tmp_path / "e.creds")  # fmt: skip
    _expect_error(capsys, owner, ["enroll", "--home", str(tmp_path / "nohome"), "--name", "a", "--out", str(tmp_path / "a.creds")],
                  "not an owner home", tmp_path / "a.creds")  # fmt: skip
    _expect_error(
        capsys,
        owner,
        ["package-emulator", "--home", home, "--out", str(tmp_path / "b")],
        "--home and --for go together",
    )
    _expect_error(capsys, owner, ["package-emulator", "--home", home, "--for", "ghost", "--out", str(tmp_path / "b")],
                  "no active data owner", tmp_path / "b")  # fmt: skip
    _expect_error(
        capsys,
        owner,
        ["revoke", "--home", home, "--name", "ghost"],
        "no active data owner named 'ghost'",
    )
    _expect_error(capsys, owner, ["merge-adapter", "--home", home, "--adapter", "abc", "--out", str(tmp_path / "m")],
                  "no such adapter", tmp_path / "m")  # fmt: skip
    (tmp_path / "bad.creds").write_text("{}")
    _expect_error(capsys, data_owner, ["fetch", "--server", "localhost:1", "--credentials", str(tmp_path / "bad.creds"), "--out", str(tmp_path / "f")],
                  "not an offsite-tuning credentials file", tmp_path / "f")  # fmt: skip
    _expect_error(capsys, data_owner, ["fetch", "--server", "localhost:1", "--credentials", str(tmp_path / "none.creds"), "--out", str(tmp_path / "f")],
                  "credentials file not found", tmp_path / "f")  # fmt: skip
    _expect_error(
        capsys,
        data_owner,
        ["finetune", "--data", "d.txt", "--out", str(tmp_path / "a")],
        "exactly one of --bundle",
    )


@pytest.mark.parametrize("bad", ["nonsense", "127.0.0.1:1"])
def test_unreachable_server_is_a_clear_error(tmp_path, capsys, bad):
    assert owner(["init", "--home", str(tmp_path / "h")]) == 0
    assert (
        owner(
            [
                "enroll",
                "--home",
                str(tmp_path / "h"),
                "--name",
                "a",
                "--out",
                str(tmp_path / "a.creds"),
            ]
        )
        == 0
    )
    _expect_error(capsys, data_owner, ["fetch", "--server", bad, "--credentials", str(tmp_path / "a.creds"), "--retries", "1",
                                       "--out", str(tmp_path / "f")], "UNAVAILABLE", tmp_path / "f")  # fmt: skip
