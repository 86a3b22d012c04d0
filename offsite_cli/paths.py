"""Which arguments of a command name files it reads and which name what it writes, and the one
check every command runs before it starts: no output may be, contain or lie inside an input.

`--overwrite` never overrides it: replacing an output that holds an input (an owner home, the
full model, a bundle, the credentials, the data) would destroy the input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from offsite.atomic import check_apart

# argparse dest -> flag, for the arguments that name something a command writes
OUTPUTS = {
    "out": "--out",
    "checkpoint_dir": "--checkpoint-dir",
    "bundle_dir": "--bundle-dir",
    "work": "--work",
}
# ... and for those naming something it reads (only paths that exist are inputs: a hub id is not)
INPUTS = {
    "home": "--home", "model": "--model", "bundle": "--bundle", "adapter": "--adapter", "data": "--data",
    "credentials": "--credentials", "signer_key": "--signer-key", "selection_data": "--selection-data",
    "distill_data": "--distill-data", "train": "--train", "test": "--test", "data_root": "--data-root",
    "task": "--task", "config": "--config", "recipe": "--recipe",
}  # fmt: skip
# string arguments that name no file (a test checks every command's arguments fall in one of the three)
NOT_PATHS = {
    "bundle_id", "dp_accountant", "dtype", "for_", "format", "insecure_dev_identity", "layerwise_inputs", "listen",
    "lr_scheduler", "mixed_precision", "name", "peft", "round_schedule", "selection", "server", "server_name",
}  # fmt: skip
# commands that create what is an input elsewhere
CREATED = {"init": {"home"}}


def _values(value) -> list[str]:
    if value is None or isinstance(value, bool):
        return []
    return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]


def roles(args: argparse.Namespace) -> tuple[dict[str, str], dict[str, Path], dict[str, Path]]:
    """(outputs, input folders, input files) of a parsed command line, keyed by flag."""
    created = CREATED.get(getattr(args, "command", ""), set())
    outputs, dirs, files = {}, {}, {}
    for dest, value in vars(args).items():
        for i, v in enumerate(_values(value)):
            flag = (OUTPUTS.get(dest) or INPUTS.get(dest, "")) + (f" #{i + 1}" if i else "")
            if dest in OUTPUTS or dest in created:
                outputs[flag] = v
            elif dest in INPUTS and Path(v).exists():
                (dirs if Path(v).is_dir() else files)[flag] = Path(v)
    return outputs, dirs, files


def check_outputs_apart(args: argparse.Namespace) -> None:
    """Refuse (OffsiteError) a command line whose output is, holds or lies inside one of its inputs."""
    outputs, dirs, files = roles(args)
    check_apart(outputs, dirs, files)  # an input file: the output may not be it nor hold it
