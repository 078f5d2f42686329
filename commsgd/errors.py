"""Exceptions that carry a one-line message for the user.

The CLI turns any `UserError` into that line on stderr and exit code 2; everything else is a bug.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: config, flags, data directory, checkpoint. Exit code 2."""


class ConfigError(UserError):
    """A config field or flag is unknown, of the wrong type or out of range."""


class DataError(UserError):
    """A data directory or file is missing or not in the expected layout."""


class CheckpointError(UserError):
    """A checkpoint or run directory cannot be used to resume."""


class WorkerError(Exception):
    """A failure of one worker's environment that it explains in one line (e.g. a full disk while
    saving a checkpoint): the worker that hit it prints the line and exits with code 1."""


def say(line: str) -> None:
    """Write one line to stderr in one write, so the lines of workers sharing a terminal or a pipe
    never interleave (`print` writes the text and its newline apart when stderr is unbuffered,
    as under PYTHONUNBUFFERED=1)."""
    import sys

    sys.stderr.write(line + "\n")
    sys.stderr.flush()
