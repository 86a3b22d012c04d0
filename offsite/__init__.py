"""Offsite-tuning: fine-tune a model's adapter through a lossy emulator, then plug it back.

One recipe function per user command (imported on first use, so `import offsite` stays light
and nothing imports grpc before a server or client is needed):

| command                         | recipe                                  |
|---------------------------------|-----------------------------------------|
| owner package-emulator          | offsite.package (PackageSpec)           |
| owner package-emulator --home   | offsite.issue_bundle                    |
| owner merge-adapter             | offsite.merge (MergeSpec)               |
| owner evaluate-offsite          | offsite.evaluate (EvaluateSpec)         |
| owner serve                     | offsite.serve                           |
| data-owner finetune             | offsite.finetune_bundle (FinetuneJob)   |
| data-owner fetch                | offsite.fetch                           |
| data-owner submit               | offsite.submit                          |
| owner federate                  | offsite.federate (FederationSpec)       |
| data-owner join                 | offsite.join                            |
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_RECIPES = {
    "package": "offsite.emulator.package",
    "PackageSpec": "offsite.emulator.package",
    "issue_bundle": "offsite.exchange.home",
    "merge": "offsite.artefacts.merge",
    "MergeSpec": "offsite.artefacts.merge",
    "evaluate": "offsite.evaluation.recipe",
    "EvaluateSpec": "offsite.evaluation.recipe",
    "serve": "offsite.transport.server",
    "finetune_bundle": "offsite.training.finetune",
    "FinetuneJob": "offsite.training.finetune",
    "fetch": "offsite.transport.client",
    "submit": "offsite.transport.client",
    "federate": "offsite.exchange.federation",
    "FederationSpec": "offsite.exchange.federation",
    "join": "offsite.transport.join",
}
__all__ = ["__version__", *_RECIPES]


def __getattr__(name: str):
    if name in _RECIPES:
        return getattr(importlib.import_module(_RECIPES[name]), name)
    raise AttributeError(f"module 'offsite' has no attribute {name!r}")
