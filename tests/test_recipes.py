"""The recipes as a library user calls them (`import offsite`): the whole exchange without a CLI,
and the errors naming spec fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from exchange_env import thread_server
from tiny import CORPUS, save_tiny

import offsite
from offsite.errors import OffsiteError


def test_the_exchange_through_the_recipes(tmp_path):
    save_tiny("llama", tmp_path / "model")
    (tmp_path / "d.txt").write_text(CORPUS)
    home = tmp_path / "home"
    assert offsite.create_home(home, ["localhost"])["home"] == str(home)
    offsite.enroll_data_owner(home, "acme", tmp_path / "acme.creds")
    spec = offsite.PackageSpec(
        out=tmp_path / "bundle", model=str(tmp_path / "model"), emulator_layers=2
    )
    packaged = offsite.package_emulator(spec, home=home, issued_to="acme")
    assert packaged["issued_to"] == "acme" and packaged["dropped_blocks"]

    steps = []
    job = offsite.FinetuneJob(data=tmp_path / "d.txt", out=tmp_path / "adapter", block_size=16)
    from offsite.exchange.home import open_home

    with thread_server(open_home(home)) as address:
        trained = offsite.finetune(
            offsite.FinetuneSpec(job=job, train=offsite.TrainConfig(max_steps=2, batch_size=2),
                                 remote=offsite.Remote(address), credentials=tmp_path / "acme.creds"),
            on_step=steps.append,
        )  # fmt: skip
    assert [s.step for s in steps] == [1, 2] and trained["steps"] == 2
    assert trained["submitted"]["status"] == "verified"
    assert (tmp_path / "adapter.bundle" / "offsite_manifest.json").is_file(), (
        "downloaded beside OUT"
    )

    (received,) = offsite.list_adapters(home)
    merged = offsite.merge_adapter(
        offsite.MergeRequest(adapter=received["adapter_id"], out=tmp_path / "merged", home=home,
                             model=str(tmp_path / "model"))
    )  # fmt: skip
    assert merged["signer"] == "acme" and merged["verified"]["values"] == "finite"
    assert json.loads((tmp_path / "merged" / "offsite_merge.json").read_text())["signer"] == "acme"

    held_out = offsite.HeldOut(tmp_path / "d.txt", block_size=16, max_sequences=2)
    full = offsite.model_perplexity(held_out, str(tmp_path / "model"))
    emulator = offsite.emulator_perplexity(held_out, tmp_path / "bundle", tmp_path / "adapter")
    assert full["sequences"] == emulator["sequences"] == 2 and emulator["adapter"] == str(
        tmp_path / "adapter"
    )


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: offsite.TrainConfig(max_steps=0), "`max_steps`"),
        (lambda: offsite.HeldOut(Path("x"), batch_size=0), "`batch_size`"),
        (lambda: offsite.FinetuneSpec(job=offsite.FinetuneJob(Path("d"), Path("o"))), "`bundle`"),
        (
            lambda: offsite.package_emulator(offsite.PackageSpec(out=Path("o")), home=Path("h")),
            "`issued_to`",
        ),
        (
            lambda: offsite.merge_adapter(offsite.MergeRequest(adapter="a", out=Path("o"))),
            "`bundle` is required",
        ),
    ],
)
def test_recipe_errors_name_spec_fields(build, field):
    with pytest.raises(OffsiteError, match=field):
        build()


def test_a_nested_spec_is_named_by_its_path():
    from offsite.errors import spec_fields

    with (
        pytest.raises(OffsiteError, match=r"`distill\.learning_rate` must be positive"),
        spec_fields("distill"),
    ):
        offsite.TrainConfig(learning_rate=-1.0)
