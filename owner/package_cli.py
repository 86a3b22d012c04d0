"""The options of `owner package-emulator`: the model, the split, and the emulator recipe."""

from __future__ import annotations

from pathlib import Path

from offsite.emulator.layerwise import INPUTS, LayerwiseConfig
from offsite.emulator.package import PackageSpec
from offsite.emulator.recipe import EmulatorRecipe
from offsite.emulator.selection import RULES
from offsite.models.loading import DEFAULT_MODEL
from offsite_cli.args import add_dtype, int_list
from owner.commands import cmd_package

PKG = PackageSpec(out=Path())  # the library's defaults, shown and used by the options
RECIPE = EmulatorRecipe()


def add_package(sub) -> None:
    p = sub.add_parser("package-emulator", help="full model in, emulator bundle out")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub id, HF directory, .gguf file, or {DEFAULT_MODEL} (default)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="bundle directory to create (keep it there: the server serves it from there)",
    )
    p.add_argument(
        "--home", default=None, help="owner home: sign the bundle and register it for --for"
    )
    p.add_argument(
        "--for", dest="for_", default=None, help="the enrolled data owner this bundle is issued to"
    )
    _add_split(p)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--stream", action="store_true",
                   help="build the bundle from the model's safetensors files, one block in memory at a time (big "
                   "models): redundancy selection and layer-wise fitting run block by block; similarity selection, "
                   "distillation, pruning, quantization and --dtype need the whole model and are refused")  # fmt: skip
    add_dtype(p)
    before = {a.dest for a in p._actions}
    _add_quality(p)
    # what --recipe sets, so that a command line setting it too is refused (its data files and the
    # run's checkpoints are given beside a recipe)
    recipe_options = {a.dest: a.default for a in p._actions if a.dest not in before | RECIPE_INPUTS}
    p.set_defaults(func=cmd_package, recipe_options=recipe_options)


def _add_split(p) -> None:
    """Which blocks are the adapter, and which middle blocks the emulator keeps."""
    p.add_argument(
        "--adapter-bottom",
        type=int,
        default=PKG.adapter_bottom,
        help=f"bottom blocks in the adapter (default {PKG.adapter_bottom})",
    )
    p.add_argument(
        "--adapter-top",
        type=int,
        default=PKG.adapter_top,
        help=f"top blocks in the adapter (default {PKG.adapter_top})",
    )
    p.add_argument(
        "--adapter-blocks",
        type=int_list,
        default=None,
        help="explicit adapter block indices, e.g. 0,1,28,29",
    )
    p.add_argument(
        "--emulator-layers", type=int, default=None, help="middle blocks to keep (default: half)"
    )
    p.add_argument(
        "--drop-ratio",
        type=float,
        default=None,
        help="share of middle blocks to drop instead of --emulator-layers",
    )
    p.add_argument(
        "--emulator-blocks",
        type=int_list,
        default=None,
        help="explicit middle block indices to keep",
    )


RECIPE_INPUTS = {"recipe", "selection_data", "distill_data", "checkpoint_dir", "resume"}


def _add_quality(p) -> None:
    g = p.add_argument_group("emulator quality")
    g.add_argument("--recipe", metavar="FILE.yaml|BUNDLE", default=None,
                   help="the emulator recipe from a YAML file (EmulatorRecipe's fields), or the one a bundle was made "
                   "with (then --selection-data/--distill-data give its data files, checked by sha256); the "
                   "other options of this group are then left unset")  # fmt: skip
    g.add_argument("--selection", choices=RULES, default=RECIPE.selection,
                   help="which middle blocks to keep: redundancy (default: drop the blocks that change their input least), "
                   "uniform (the paper's rule), similarity (CRaSh-style clusters)")  # fmt: skip
    g.add_argument(
        "--selection-data",
        default=None,
        help="sample text to measure blocks on (default: --distill-data, else a built-in ~110 KB WikiText sample)",
    )
    g.add_argument(
        "--distill-data",
        default=None,
        help="public corpus (.txt/.jsonl): distil the kept blocks on it",
    )
    _add_layerwise(p)
    _add_distill(g)
    g.add_argument(
        "--prune",
        type=float,
        default=0.0,
        help="magnitude-prune this share of emulator block weights",
    )
    g.add_argument(
        "--quantize-bits",
        type=int,
        default=None,
        help="round emulator block weights to N-bit integers",
    )


def _add_layerwise(p) -> None:
    d = LayerwiseConfig()
    on = EmulatorRecipe().layerwise is not None
    g = p.add_argument_group(
        "layer-wise distillation (each kept block fitted to the span of blocks it stands for)"
    )
    g.add_argument("--layerwise-steps", type=int, default=d.steps if on else 0,
                   help=f"steps per kept block; 0 turns it off (default {d.steps if on else 0})")  # fmt: skip
    g.add_argument("--layerwise-lr", type=float, default=d.learning_rate, help=f"learning rate (default {d.learning_rate})")  # fmt: skip
    g.add_argument("--layerwise-inputs", choices=INPUTS, default=d.inputs,
                   help=f"what each block learns from: the emulator's own chain, or the full model's states (default {d.inputs})")  # fmt: skip
    g.add_argument("--layerwise-noise", type=float, default=d.noise, help=f"relative input noise (default {d.noise})")  # fmt: skip
    g.add_argument("--layerwise-grad-weight", type=float, default=d.grad_weight,
                   help=f"weight of matching the gradient each span passes down (default {d.grad_weight})")  # fmt: skip
    g.add_argument("--layerwise-sequences", type=int, default=d.max_sequences,
                   help=f"sample sequences (of --block-size tokens) to fit on (default {d.max_sequences})")  # fmt: skip
    g.add_argument("--layerwise-no-gate", action="store_true",
                   help="keep the fitted blocks even where their transfer score is below the plain drop's "
                        "(by default the better-scoring of the two is shipped)")  # fmt: skip


def _add_distill(g) -> None:
    g.add_argument(
        "--distill-steps",
        type=int,
        default=RECIPE.distill.max_steps,
        help=f"distillation optimizer steps (default {RECIPE.distill.max_steps})",
    )
    g.add_argument(
        "--distill-lr",
        type=float,
        default=RECIPE.distill.learning_rate,
        help="distillation learning rate (default 1e-4, cosine)",
    )
    g.add_argument(
        "--distill-warmup",
        type=int,
        default=RECIPE.distill.warmup_steps,
        help=f"warm-up steps (default {RECIPE.distill.warmup_steps})",
    )
    g.add_argument(
        "--distill-weight",
        type=float,
        default=RECIPE.distill_weight,
        help="weight w of the hidden-state loss (default 30)",
    )
    g.add_argument(
        "--distill-batch-size",
        type=int,
        default=RECIPE.distill.batch_size,
        help=f"sequences per step (default {RECIPE.distill.batch_size})",
    )
    g.add_argument(
        "--distill-eval-every",
        type=int,
        default=50,
        help="validate (and keep the best) every N steps",
    )
    g.add_argument(
        "--block-size",
        type=int,
        default=RECIPE.block_size,
        help="tokens per sequence for selection and distillation",
    )
    g.add_argument(
        "--save-every", type=int, default=50, help="distillation checkpoint every N steps"
    )
    g.add_argument(
        "--checkpoint-dir", default=None, help="distillation checkpoints (default OUT.ckpt)"
    )
    g.add_argument("--resume", action="store_true", help="continue an interrupted distillation")
