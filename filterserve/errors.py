"""One exception type for every problem a user can fix.

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class FilterServeError(Exception):
    """A problem with the user's input, files or environment, with a message that names it."""


class ParityError(FilterServeError):
    """An exported variant gives scores that differ from the PyTorch + PEFT reference."""
