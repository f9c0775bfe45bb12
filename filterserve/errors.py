"""One exception type for every problem a user can fix, and the exit code it ends a command with.

The CLI prints these as a single line and exits with their ``exit_code``; so it does an OSError
that names a file (the net under the commands' own checks). Anything else is a bug and keeps its
traceback.
"""

# A problem with the user's input, files or environment (filterserve/cli.py's default).
EXIT_USER_ERROR = 2


class FilterServeError(Exception):
    """A problem with the user's input, files or environment, with a message that names it."""

    exit_code = EXIT_USER_ERROR


class ParityError(FilterServeError):
    """An exported variant gives scores that differ from the PyTorch + PEFT reference."""


def describe_os_error(exc: OSError) -> str:
    """``PATH: what the system said`` (both paths of a rename or a copy), as one line."""
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    return f"{paths}: {exc.strerror or exc}"
