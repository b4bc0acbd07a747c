"""Checks that an output path can be written, made before any work starts, so that a
read-only folder or a file in the way is one clear error at once, not a traceback after
minutes of training. Nothing here writes anything."""

from __future__ import annotations

import os
from pathlib import Path

from reslab.errors import UsageError

__all__ = ["check_writable_dir", "check_writable_file"]


def _nearest_existing(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_dir_usable(where: Path, what: str) -> None:
    if not where.is_dir():
        raise UsageError(f"{what}: {where} is a file, so nothing can be created under it; choose another path")
    if not os.access(where, os.W_OK | os.X_OK):
        raise UsageError(
            f"{what}: cannot write in {where} (permission denied or read-only); "
            "choose a folder you can write to or change its permissions"
        )


def check_writable_dir(path: str | Path, option: str = "--out") -> None:
    """``path`` is (or can be created as) a folder this process can write files in."""
    p = Path(path)
    what = f"{option} {p}" if option else str(p)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{what} is a file, not a folder; choose a folder (or move the file away)")
    _check_dir_usable(_nearest_existing(p), what)


def check_writable_file(path: str | Path, option: str = "--out") -> None:
    """``path`` names a file this process can create or replace (in a writable folder)."""
    p = Path(path)
    what = f"{option} {p}" if option else str(p)
    if p.is_dir():
        raise UsageError(f"{what} is a folder; give a file name")
    _check_dir_usable(_nearest_existing(p.parent), what)
