"""Errors that reach the user.

A :class:`UsageError` is a mistake the user can fix (a bad option, a missing or
corrupt file, an incompatible checkpoint). The command-line entry point prints its
message on one line and exits with status 2, without a traceback. Library callers get
an ordinary exception; it subclasses ``ValueError`` so code that validates arguments
the usual way keeps working.
"""

from __future__ import annotations

import errno


class UsageError(ValueError):
    """A user mistake with a message that names the problem and the fix."""


class DivergedError(RuntimeError):
    """Training produced a non-finite loss."""

    def __init__(self, message: str, epoch: int) -> None:
        super().__init__(message)
        self.epoch = epoch


_OS_FIXES = {
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "it is on a read-only file system; choose another path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "it is a folder; give a file",
    errno.EEXIST: "it already exists; choose another path",
    errno.ENOSPC: "the disk is full; free space or choose another path",
    errno.EDQUOT: "the disk quota is exhausted; free space or choose another path",
}


def os_error_message(e: OSError) -> str:
    """One line for an OSError: the path, the problem, the fix."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None) or "a file"
    problem = e.strerror or str(e) or type(e).__name__
    fix = _OS_FIXES.get(e.errno or 0, "check the path and try again")
    return f"{where}: {problem.lower() if problem[:1].isupper() and problem[1:2].islower() else problem}; {fix}"


def is_out_of_memory(e: BaseException) -> bool:
    """Host or device memory ran out (torch's OutOfMemoryError, its CPU allocator, numpy)."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e)
    return "out of memory" in text.lower() or "can't allocate memory" in text


def out_of_memory_message(batch: int | None = None) -> str:
    """One line for an out-of-memory stop, naming the batch size that failed when known."""
    if batch:
        return (
            f"out of memory at batch size {batch}; pass a smaller --batch-size (e.g. {max(1, int(batch) // 2)}) "
            "or free memory on the device; finished results are kept"
        )
    return "out of memory; use a smaller model, batch or input, or free memory on the device"
