"""Progress bars for the CLIs."""

from __future__ import annotations

from collections.abc import Callable

from tqdm import tqdm

from offsite.evaluation.perplexity import check_eval_options, perplexity_on_file
from offsite.training.loop import StepInfo


class TrainingBar:
    """A tqdm bar fed by the training loop's `on_step` callback: loss, lr and tokens/s."""

    def __init__(self, desc: str = "fine-tuning") -> None:
        self.desc = desc
        self.bar: tqdm | None = None
        self.last_step = 0

    def __call__(self, info: StepInfo) -> None:
        if self.bar is not None and info.step <= self.last_step:
            self.close()  # a second training run reports to the same callback: start a fresh bar
            self.bar = None
        self.last_step = info.step
        if self.bar is None:
            self.bar = tqdm(
                total=info.max_steps,
                initial=info.step - 1,
                desc=self.desc,
                unit="step",
                dynamic_ncols=True,
            )
        post = {
            "loss": f"{info.loss:.4f}",
            "lr": f"{info.learning_rate:.2e}",
            "tok/s": f"{info.tokens_per_s:,.0f}",
        }
        if info.val_perplexity is not None:
            post["val_ppl"] = f"{info.val_perplexity:.2f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def counting_bar(total: int | None, desc: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    """An (advance, close) pair around a tqdm bar of `total` items."""
    bar = tqdm(total=total, desc=desc, unit="seq", dynamic_ncols=True, leave=False)
    return bar.update, bar.close


def perplexity_with_bar(model, tokenizer, args) -> dict:
    """Perplexity on --data with the --block-size/--batch-size/--max-sequences options, with a bar."""
    check_eval_options(args.block_size, args.batch_size, args.max_sequences)
    advance, close = counting_bar(args.max_sequences, "evaluating")
    try:
        return perplexity_on_file(
            model, tokenizer, args.data, block_size=args.block_size, batch_size=args.batch_size,
            max_sequences=args.max_sequences, on_batch=advance,
        )  # fmt: skip
    finally:
        close()
