"""The one exception type for user-facing mistakes (bad input, bad files, bad artefacts)."""


class OffsiteError(ValueError):
    """A problem the user can fix; the message names the file or field and how to fix it."""


class VerificationError(OffsiteError):
    """A received artefact failed a check (hash, signature, key set, shape, dtype, finite values)."""
