"""Techniques from outside the package: entry points and ``--import``.

A technique written elsewhere reaches the registry (:mod:`reslab.nn.techniques`) in one of
two ways, with no edit to reslab:

* an installed distribution declares it in the entry-point group ``reslab.techniques``
  (``[project.entry-points."reslab.techniques"] half = "mypkg.techniques:HalfShortcut"``,
  or a module that registers its techniques with :func:`reslab.register` when imported).
  Entry points are loaded lazily: when a technique name is not found, and when the
  techniques are listed;
* the command line imports a module first: ``reslab train --import mymodule ...`` (any
  command, repeatable; the current directory is searched too). The module list is also
  put in the environment variable ``RESLAB_IMPORT`` (comma-separated) for the duration
  of the command, so the worker processes that ``compare`` and ``probe`` spawn import the
  same modules; setting the variable by hand works the same way.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib.metadata import entry_points

from reslab.caches import new_cache
from reslab.errors import UsageError

ENTRY_POINT_GROUP = "reslab.techniques"
IMPORT_ENV = "RESLAB_IMPORT"

# Entry points already loaded, as (name, value): each is loaded once per process.
_ENTRY_POINTS_LOADED: dict[tuple[str, str], bool] = new_cache("plugins.entry_points_loaded")


def import_modules(names: Iterable[str]) -> None:
    """Import each module by name (its import registers its techniques).

    The current directory is searched after the usual path, as ``python -m`` would, so
    ``reslab train --import mymodule`` finds ``./mymodule.py``. A module that cannot be
    imported is a :class:`~reslab.errors.UsageError` naming it.
    """
    names = [n for n in names if n]
    if not names:
        return
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure of the user's module is reported the same way
            raise UsageError(
                f"cannot import module {name!r} given with --import ({type(e).__name__}: {e}); check its name "
                "and that it is on PYTHONPATH or in the current directory"
            ) from None


def env_modules() -> list[str]:
    """The modules listed in ``RESLAB_IMPORT``."""
    return [n.strip() for n in os.environ.get(IMPORT_ENV, "").split(",") if n.strip()]


def import_from_env() -> None:
    """Import the modules listed in ``RESLAB_IMPORT`` (a worker process's first step)."""
    import_modules(env_modules())


@contextmanager
def imported(names: Iterable[str]) -> Iterator[None]:
    """Import ``names`` and list them in ``RESLAB_IMPORT`` until the block ends.

    Processes spawned inside the block (``compare``'s and ``probe``'s workers) inherit the
    variable and import the same modules; the variable is restored afterwards, so a
    command run in-process (tests, notebooks) leaves the environment as it found it.
    """
    names = list(dict.fromkeys(n for n in names if n))
    import_modules(names)
    previous = os.environ.get(IMPORT_ENV)
    if names:
        os.environ[IMPORT_ENV] = ",".join(dict.fromkeys([*env_modules(), *names]))
    try:
        yield
    finally:
        if names:
            if previous is None:
                os.environ.pop(IMPORT_ENV, None)
            else:
                os.environ[IMPORT_ENV] = previous


def load_entry_points() -> list[object]:
    """Load the ``reslab.techniques`` entry points of the installed distributions not loaded
    yet, and return what they name.

    An entry point may name a module (importing it registers its techniques) or a
    :class:`~reslab.nn.technique.Technique` subclass, which the registry registers under
    its ``name`` unless its module already did.
    """
    loaded: list[object] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        key = (ep.name, ep.value)
        if key in _ENTRY_POINTS_LOADED:
            continue
        _ENTRY_POINTS_LOADED[key] = True
        try:
            loaded.append(ep.load())
        except Exception as e:  # noqa: BLE001 - a broken plugin is reported, not a traceback
            raise UsageError(
                f"technique plugin {ep.name!r} ({ep.value}, entry point group {ENTRY_POINT_GROUP}) failed to load "
                f"({type(e).__name__}: {e}); fix or uninstall the package that provides it"
            ) from None
    return loaded


__all__ = [
    "ENTRY_POINT_GROUP",
    "IMPORT_ENV",
    "env_modules",
    "import_from_env",
    "import_modules",
    "imported",
    "load_entry_points",
]
