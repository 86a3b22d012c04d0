"""The one exception type for user-facing mistakes (bad input, bad files, bad artefacts).

Messages name what is wrong in the library's own terms: a spec field is written in backticks
(`` `max_steps` must be at least 1 ``), and a field of a nested spec by its path from the spec
the caller built (`` `distill.learning_rate` ``). The CLIs show each such field as the flag that
sets it (one table, `offsite_cli/flags.py`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator

FIELD = re.compile(r"`([a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*)`")


class OffsiteError(ValueError):
    """A problem the user can fix; the message names the file or field and how to fix it."""

    def reworded(self, name: Callable[[str], str]) -> str:
        """The message with every `field` shown as `name(field)`."""
        return FIELD.sub(lambda m: name(m[1]), str(self))


class VerificationError(OffsiteError):
    """A received artefact failed a check (hash, signature, key set, shape, dtype, finite values)."""


@contextlib.contextmanager
def spec_fields(prefix: str) -> Iterator[None]:
    """Within, a spec built as field `prefix` of another: its errors name `prefix.field`."""
    try:
        yield
    except OffsiteError as e:
        message = FIELD.sub(lambda m: f"`{prefix}.{m[1]}`", str(e))
        raise type(e)(message) from None
