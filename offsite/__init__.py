"""Offsite-tuning: fine-tune a model's adapter through a lossy emulator, then plug it back.

One recipe per user command (`offsite/recipes/`), importable from here (on first use, so
`import offsite` stays light and nothing imports grpc before a server or client is needed):

| command                     | recipe                                                 |
|-----------------------------|--------------------------------------------------------|
| owner init / enroll / revoke | offsite.create_home / enroll_data_owner / revoke_data_owner |
| owner package-emulator      | offsite.package_emulator (PackageSpec, EmulatorRecipe) |
| owner serve                 | offsite.serve                                          |
| owner merge-adapter         | offsite.merge_adapter (MergeRequest)                   |
| owner evaluate-offsite      | offsite.evaluate (EvaluateSpec)                        |
| owner evaluate              | offsite.model_perplexity (HeldOut)                     |
| owner federate              | offsite.federate_rounds (FederationSpec)               |
| owner sample-corpus         | offsite.sample_public_corpus (SampleConfig)            |
| data-owner finetune         | offsite.finetune (FinetuneSpec, FinetuneJob, TrainConfig) |
| data-owner fetch / submit   | offsite.fetch_bundle / submit_adapter (Remote)         |
| data-owner join             | offsite.join_rounds (JoinSpec)                         |
| data-owner evaluate         | offsite.emulator_perplexity (HeldOut)                  |
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_RECIPES = {
    "create_home": "offsite.recipes.home",
    "enroll_data_owner": "offsite.recipes.home",
    "revoke_data_owner": "offsite.recipes.home",
    "list_adapters": "offsite.recipes.home",
    "clean_home": "offsite.recipes.home",
    "package_emulator": "offsite.recipes.package",
    "PackageSpec": "offsite.emulator.package",
    "EmulatorRecipe": "offsite.emulator.recipe",
    "serve": "offsite.recipes.serve",
    "merge_adapter": "offsite.recipes.merge",
    "MergeRequest": "offsite.recipes.merge",
    "evaluate": "offsite.recipes.evaluate",
    "EvaluateSpec": "offsite.recipes.evaluate",
    "model_perplexity": "offsite.recipes.perplexity",
    "emulator_perplexity": "offsite.recipes.perplexity",
    "HeldOut": "offsite.recipes.perplexity",
    "federate_rounds": "offsite.recipes.federate",
    "FederationSpec": "offsite.recipes.federate",
    "sample_public_corpus": "offsite.recipes.corpus",
    "SampleConfig": "offsite.emulator.corpus",
    "finetune": "offsite.recipes.finetune",
    "FinetuneSpec": "offsite.recipes.finetune",
    "FinetuneJob": "offsite.training.finetune",
    "TrainConfig": "offsite.training.loop",
    "fetch_bundle": "offsite.recipes.fetch",
    "submit_adapter": "offsite.recipes.submit",
    "Remote": "offsite.recipes.remote",
    "join_rounds": "offsite.recipes.join",
    "JoinSpec": "offsite.recipes.join",
}
__all__ = ["__version__", *_RECIPES]


def __getattr__(name: str):
    if name in _RECIPES:
        return getattr(importlib.import_module(_RECIPES[name]), name)
    raise AttributeError(f"module 'offsite' has no attribute {name!r}")
