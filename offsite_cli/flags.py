"""The one table from the library's spec fields to the flags that set them: library errors name
fields (`` `max_steps` ``), the CLIs show the flag (``--max-steps``)."""

from __future__ import annotations

from offsite.errors import OffsiteError

FLAGS = {
    # fields set by the flag of the same name (TrainConfig's too; `distill.` ones below)
    **{
        f: "--" + f.replace("_", "-")
        for f in [
            "epochs",
            "max_steps",
            "learning_rate",
            "lr_scheduler",
            "warmup_steps",
            "weight_decay",
            "batch_size",
            "grad_accum",
            "max_grad_norm",
            "seed",
            "mixed_precision",
            "save_every",
            "eval_every",
            "loss_chunk_tokens",
            "block_size",
            "val_fraction",
            "checkpoint_dir",
            "resume",
            "overwrite",
            "data",
            "out",
            "model",
            "dtype",
            "bundle",
            "bundle_id",
            "bundle_dir",
            "credentials",
            "retries",
            "adapter",
            "home",
            "name",
            "rounds",
            "work",
            "round_schedule",
            "members",
            "quorum",
            "max_weight_ratio",
            "signer_key",
            "allow_unsigned",
            "allow_revoked",
            "listen",
            "max_sequences",
            "documents",
            "tokens",
            "temperature",
            "top_k",
            "top_p",
            "adapter_bottom",
            "adapter_top",
            "adapter_blocks",
            "emulator_layers",
            "drop_ratio",
            "emulator_blocks",
            "stream",
            "selection",
            "selection_data",
            "distill_data",
            "distill_weight",
            "prune",
            "quantize_bits",
            "data_root",
            "eval_limit",
            "train_limit",
            "full_learning_rate",
            "full_finetune",
        ]
    },
    "remote": "--server",
    "attempts": "--retries",
    "issued_to": "--for",
    "poll_s": "--poll",
    "wait_s": "--wait",
    "deadline_s": "--deadline",
    "tasks": "--task",
    "train_file": "--train",
    "test_file": "--test",
    "server_names": "--server-name",
    "distill.max_steps": "--distill-steps",
    "distill.learning_rate": "--distill-lr",
    "distill.warmup_steps": "--distill-warmup",
    "distill.batch_size": "--distill-batch-size",
    "distill.save_every": "--save-every",
    "distill.eval_every": "--distill-eval-every",
    "layerwise": "--layerwise-steps",
    "harmonizer": "--recipe",  # a stand-in kind of emulator is set in a recipe file
    "layerwise.steps": "--layerwise-steps",
    "layerwise.learning_rate": "--layerwise-lr",
    "layerwise.inputs": "--layerwise-inputs",
    "layerwise.noise": "--layerwise-noise",
    "layerwise.max_sequences": "--layerwise-sequences",
    "layerwise.grad_weight": "--layerwise-grad-weight",
    "peft": "--peft",
    "peft.method": "--peft",
    "peft.rank": "--lora-rank",
    "peft.alpha": "--lora-alpha",
    "peft.dropout": "--lora-dropout",
    "peft.targets": "--peft-targets",
    "peft.virtual_tokens": "--peft-virtual-tokens",
    "dp": "--dp-epsilon",
    "dp.epsilon": "--dp-epsilon",
    "dp.delta": "--dp-delta",
    "dp.max_grad_norm": "--max-grad-norm",
    "dp.accountant": "--dp-accountant",
}

# where one command names a field differently
BY_COMMAND = {
    "evaluate-offsite": {"max_steps": "--steps"},
}


def worded(error: OffsiteError, command: str | None) -> str:
    """`error`'s message with each spec field shown as the flag of `command` that sets it."""
    flags = {**FLAGS, **BY_COMMAND.get(command or "", {})}
    return error.reworded(lambda field: flags.get(field, field))
