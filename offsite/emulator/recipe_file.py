"""An emulator recipe as data: a YAML file the owner writes, and the record a bundle keeps of it.

A recipe file is `EmulatorRecipe`'s fields as YAML (nested `distill:` and `layerwise:` mappings;
`layerwise: null` turns layer-wise fitting off); a relative data path is read from the file's
own folder. Every bundle's manifest records the recipe it was made with
(`emulator_recipe.recipe`): the same fields, but each data file by its name and sha256 rather than
where it lay on the owner's disk (the bundle goes to the data owner), and without the run's
checkpoint settings. `recipe_of_bundle` reads that record back, so a bundle's recipe can be
re-run: the data files are given again (by default the names it records, from the working
folder) and must be the very files it was made from.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from offsite.artefacts.bundle import open_bundle
from offsite.atomic import sha256_file
from offsite.emulator.recipe import EmulatorRecipe
from offsite.errors import OffsiteError
from offsite.settings import from_data, load_yaml, to_data

DATA_FIELDS = ("selection_data", "distill_data")
RUN_FIELDS = ("checkpoint_dir", "resume")  # how one run went, not what it made


def recipe_record(recipe: EmulatorRecipe) -> dict:
    """The record of `recipe` a bundle's manifest keeps."""
    settings = {k: v for k, v in to_data(recipe).items() if k not in RUN_FIELDS}
    files = {}
    for name in DATA_FIELDS:
        path = getattr(recipe, name)
        if path is not None:
            settings[name] = path.name
            files[name] = {"name": path.name, "sha256": sha256_file(path)}
    return {"settings": settings, "files": files}


def load_recipe(path: Path) -> EmulatorRecipe:
    """The recipe in the YAML file at `path` (relative data paths from the file's folder)."""
    recipe = load_yaml(EmulatorRecipe, path)
    moved = {
        name: Path(path).parent / getattr(recipe, name)
        for name in DATA_FIELDS
        if getattr(recipe, name) is not None and not getattr(recipe, name).is_absolute()
    }
    return replace(recipe, **moved)


def recipe_of_bundle(bundle_dir: Path, data: dict[str, Path] | None = None) -> EmulatorRecipe:
    """The recipe `bundle_dir` was made with; `data` gives its data files (field -> path; by
    default the file names the record keeps, from the working folder), each checked by sha256."""
    bundle = open_bundle(bundle_dir, weights=False)  # only the manifest is read
    record = bundle.manifest.get("emulator_recipe", {}).get("recipe")
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        raise OffsiteError(
            f"{bundle_dir}: its manifest records no recipe (made by an older version)"
        )
    recipe = from_data(EmulatorRecipe, record["settings"], f"{bundle_dir}/manifest.json")
    files = record.get("files", {})
    given = {**{k: Path(f["name"]) for k, f in files.items()}, **(data or {})}
    for name, path in given.items():
        wanted = files.get(name)
        if wanted is None:
            raise OffsiteError(f"`{name}`: {bundle_dir} was made without one; leave it out")
        if not path.is_file():
            raise OffsiteError(
                f"`{name}` {path}: no such file; {bundle_dir} was made from {wanted['name']} (sha256 {wanted['sha256'][:12]}...)"
            )
        if sha256_file(path) != wanted["sha256"]:
            raise OffsiteError(
                f"`{name}` {path} is not the file {bundle_dir} was made from ({wanted['name']}, sha256 {wanted['sha256'][:12]}...)"
            )
    return replace(recipe, **given)
