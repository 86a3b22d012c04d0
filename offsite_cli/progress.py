"""Progress bars for the CLIs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from tqdm import tqdm

from offsite.training.config import StepInfo


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
    """An (advance, close) pair around a tqdm bar of `total` items, shown from the first advance
    (an error before it leaves stderr to the one-line message)."""
    bar = None

    def advance(n: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="seq", dynamic_ncols=True, leave=False)
        bar.update(n)

    def close() -> None:
        if bar is not None:
            bar.close()

    return advance, close


@contextlib.contextmanager
def training_bar(desc: str = "fine-tuning") -> Iterator[TrainingBar]:
    """A TrainingBar closed however the training ends."""
    bar = TrainingBar(desc)
    try:
        yield bar
    finally:
        bar.close()


def bytes_bar(desc: str) -> tqdm:
    return tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True)


class TransferBars:
    """(on_total, on_bytes) callbacks that show a bytes bar once there is something to move."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.bar: tqdm | None = None

    def on_total(self, total: int) -> None:
        self.close()
        self.bar = bytes_bar(self.desc)
        self.bar.total = total

    def on_bytes(self, n: int) -> None:
        if self.bar is None:
            self.bar = bytes_bar(self.desc)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
