"""The process-wide caches, listed in one place and emptied by one function, :func:`clear`.

Some work a process does once and keeps: a decoded dataset, a measured pack route, a
calibrated statistical level. Each such cache is named in :data:`CACHES` with what it keeps,
and its module makes it here, by that name (:func:`new_cache` for a dict, :func:`memoize`
for a function's results), never as a private module-level dict. So every cache of the
package is listed below, and ``reslab.caches.clear()`` gives a process cold caches (tests
call it instead of reaching into a module; a long-lived process may call it to free memory).

Caches are per process: a worker process starts with empty ones. A cache exists once its
module is imported; clearing one that was never made does nothing. Registries (the
techniques and models by name) are not caches: clearing them would lose what was registered.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")

#: every cache of the package: its name, the module that keeps it, and what it keeps
CACHES: dict[str, tuple[str, str]] = {
    "datasets.decoded": (
        "reslab.engine.data",
        "the last in-memory dataset read, decoded and checked, by name, options and file stamps",
    ),
    "packing.routes_checked": (
        "reslab.engine.packed.check",
        "the routes by which a model packs and trains as its runs alone do, by settings and technique class",
    ),
    "packing.rates_measured": (
        "reslab.engine.packed.speed",
        "the pack route chosen and the rates measured to choose it, by settings, device and pack size",
    ),
    "blocks.gain_describes_merge": (
        "reslab.nn.blocks",
        "whether a technique's branch gain may stand for its merge, by technique class",
    ),
    "plugins.entry_points_loaded": ("reslab.nn.plugins", "the reslab.techniques entry points already loaded"),
    "grid.shared_settings": ("reslab.study.grid", "a grid's shared training settings, built and validated, by grid"),
    "calibration.min_p": (
        "reslab.study.calibration",
        "the smallest p-value over the looks on simulated null paths, by looks, noise shape and tail",
    ),
    "calibration.nominal_level": ("reslab.study.calibration", "each look's two-sided level, by looks and alpha"),
    "calibration.one_sided_level": ("reslab.study.calibration", "each look's one-sided level, by looks and alpha"),
    "version.source_commit": ("reslab.version", "the git commit of the reslab source tree"),
    "divergence.bounds": ("reslab.study.divergence", "each look's divergence-imbalance bound, by looks and alpha"),
}

# each cache made so far, by name: how to empty it and how to count its entries
_MADE: dict[str, tuple[Callable[[], None], Callable[[], int]]] = {}


def _register(name: str, clear_one: Callable[[], None], size: Callable[[], int]) -> None:
    if name not in CACHES:
        raise ValueError(f"cache {name!r} is not listed in reslab.caches.CACHES; list it there with what it keeps")
    if name in _MADE:
        raise ValueError(f"cache {name!r} is already made")
    _MADE[name] = (clear_one, size)


def new_cache(name: str) -> dict[Any, Any]:
    """An empty dict, the cache listed as ``name`` in :data:`CACHES`, emptied by :func:`clear`."""
    cache: dict[Any, Any] = {}
    _register(name, cache.clear, cache.__len__)
    return cache


def memoize(name: str, maxsize: int | None = 128) -> Callable[[Callable[..., T]], functools._lru_cache_wrapper[T]]:
    """``functools.lru_cache(maxsize)`` as the cache listed as ``name`` in :data:`CACHES`."""

    def decorate(fn: Callable[..., T]) -> functools._lru_cache_wrapper[T]:
        wrapped = functools.lru_cache(maxsize=maxsize)(fn)
        _register(name, wrapped.cache_clear, lambda: wrapped.cache_info().currsize)
        return wrapped

    return decorate


def cache_key(value: Any) -> Hashable:
    """A hashable key for settings made of dicts, lists and scalars, equal exactly when the
    settings are: dicts compare regardless of order, and a scalar keeps its type (``1``, ``1.0``
    and ``True`` are three keys); anything else is keyed by its ``repr``."""
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), cache_key(v)) for k, v in value.items())))
    if isinstance(value, list | tuple):
        return ("seq", tuple(cache_key(v) for v in value))
    if value is None or isinstance(value, str | int | float | bool):
        return (type(value).__name__, value)
    return ("repr", repr(value))


def clear(*names: str) -> None:
    """Empty the caches named (all of them when none is), those made so far in this process."""
    unknown = [n for n in names if n not in CACHES]
    if unknown:
        raise ValueError(f"unknown caches {unknown}; the caches are {', '.join(CACHES)}")
    for name in names or tuple(_MADE):
        if name in _MADE:
            _MADE[name][0]()


def sizes() -> dict[str, int]:
    """The entries each cache made so far in this process holds (a cache is made when its module
    is imported), in the order made."""
    return {name: size() for name, (_, size) in _MADE.items()}


__all__ = ["CACHES", "cache_key", "clear", "memoize", "new_cache", "sizes"]
