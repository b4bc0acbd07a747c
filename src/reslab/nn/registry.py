"""The technique registry: techniques by name, including those of plugins.

Techniques from outside the package (:mod:`reslab.nn.plugins`: ``RESLAB_IMPORT`` modules
and the ``reslab.techniques`` entry points) are loaded only when a name is not found or
the techniques are listed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from reslab.nn import plugins
from reslab.nn.technique import Technique

_REGISTRY: dict[str, type[Technique]] = {}


def register(cls: type[Technique]) -> type[Technique]:
    """Class decorator: make a technique available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY:
        raise ValueError(f"technique {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def registered(cls: type[Technique]) -> bool:
    """Whether ``cls`` itself is in the registry."""
    return _REGISTRY.get(cls.name) is cls


def _load_plugins() -> None:
    """Import the ``RESLAB_IMPORT`` modules, then register what new entry points name."""
    plugins.import_from_env()
    for obj in plugins.load_entry_points():
        if isinstance(obj, type) and issubclass(obj, Technique) and not registered(obj):
            register(obj)


def list_techniques() -> list[str]:
    """Names of every registered technique (plugins included), in registration order."""
    _load_plugins()
    return list(_REGISTRY)


def technique_class(name: str) -> type[Technique]:
    """The technique class registered as ``name``, looking in the plugins when it is not found."""
    if name not in _REGISTRY:
        _load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = ", ".join(_REGISTRY)
        raise ValueError(
            f"unknown technique {name!r}; valid techniques: {valid} (a technique from another module loads with "
            "--import MODULE or the reslab.techniques entry point)"
        ) from None


def parse_techniques(spec: str | Sequence[str]) -> list[str]:
    """``"all"``, or technique names (a comma-separated string or a sequence; ``"all"`` may be
    one of them), validated against the registry, duplicates dropped, in the order given.

    The one parser of technique lists: ``compare`` and ``probe`` both use it.
    """
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError("no techniques given; name some, e.g. baseline,norm, or 'all'")
    out: list[str] = []
    for n in names:
        if n == "all":
            out += list_techniques()
        else:
            technique_class(n)  # raises ValueError listing the valid names
            out.append(n)
    return list(dict.fromkeys(out))


def get_technique(technique: str | Technique, **kwargs: Any) -> Technique:
    """Return a technique object from a name (``kwargs`` go to its constructor) or as is."""
    if isinstance(technique, Technique):
        if kwargs:
            raise ValueError("technique arguments can only be given with a technique name")
        return technique
    if not isinstance(technique, str):
        raise ValueError(f"technique must be a name or a Technique, not {type(technique).__name__}")
    cls = technique_class(technique)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"technique {technique!r} does not take arguments {sorted(kwargs)}: {e}") from None
