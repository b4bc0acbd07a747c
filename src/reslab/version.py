"""The package version, and the source commit it runs from, in a leaf of its own so that any layer
can name them."""

from __future__ import annotations

from pathlib import Path

from reslab.caches import memoize

__version__ = "0.3.0"


@memoize("version.source_commit", maxsize=None)
def source_commit() -> str | None:
    """The git commit of the reslab source tree (``+dirty`` when it has changes), or None when
    it is not a git checkout. Read once per process, here only (``reslab.caches.clear("version.source_commit")``
    reads it again)."""
    import subprocess

    src = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
