"""Errors that reach the user.

A :class:`UsageError` is a mistake the user can fix (a bad option, a missing or
corrupt file, an incompatible checkpoint). The command-line entry point prints its
message on one line and exits with status 2, without a traceback. Library callers get
an ordinary exception; it subclasses ``ValueError`` so code that validates arguments
the usual way keeps working.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A user mistake with a message that names the problem and the fix."""


class DivergedError(RuntimeError):
    """Training produced a non-finite loss."""

    def __init__(self, message: str, epoch: int) -> None:
        super().__init__(message)
        self.epoch = epoch
