"""`owner package-emulator`: full model in, emulator bundle out; with a home, signed, issued to one
enrolled data owner and registered."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from offsite.emulator.package import PackageSpec, package
from offsite.errors import OffsiteError
from offsite.training.config import StepInfo


def package_emulator(
    spec: PackageSpec,
    *,
    home: Path | None = None,
    issued_to: str | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
) -> dict:
    """The bundle written (its path, id, to whom it is issued, and the blocks it keeps and drops);
    `on_step` hears the distillation's steps when the recipe distils."""
    if (home is None) != (issued_to is None):
        raise OffsiteError(
            "`home` and `issued_to` go together: a signed bundle is issued to one enrolled data owner"
        )
    if home is not None:
        from offsite.exchange.home import issue_bundle, open_home

        bundle = issue_bundle(open_home(home), issued_to, spec, on_step=on_step)
    else:
        bundle = package(spec, on_step=on_step)
    e = bundle.manifest["emulator"]
    return {"bundle": str(bundle.path), "bundle_id": bundle.bundle_id, "issued_to": issued_to,
            "adapter_blocks": bundle.adapter_sources, "kept_blocks": e["kept"], "dropped_blocks": e["dropped"]}  # fmt: skip
