"""The registered models and techniques as plain data, for ``reslab models``, read from their
registries: nothing here names a model or a technique.

``reslab models`` answers without importing torch, which defining a technique or a model
needs. So where only the built-ins can be registered (no plugin entry point, no
``RESLAB_IMPORT`` module, and neither registry imported in this process), the catalog reads
the built-in registrations from the source of the modules that make them
(:mod:`reslab.nn.techniques`: its ``@register`` classes; :mod:`reslab.nn.models`: its depth
tables), without running it. Anywhere else, or where that source says something only running
it would tell (a name or summary that is not a plain string), it lists the live registries
(:func:`reslab.nn.techniques.list_techniques`, :func:`reslab.nn.models.list_models`).
Either way, a technique registered with ``@register`` (a built-in or a plugin's) or a depth
added to a model family is listed as it is, with no edit here.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
#: the technique class attributes listed, and their default on the base class (``name`` has none)
_FIELDS = ("name", "summary", "reference")


class _Unreadable(Exception):
    """The source registers something that only running it would tell."""


def techniques() -> list[tuple[str, str, str]]:
    """``(name, summary, reference)`` of every registered technique, in registration order."""
    if not _live():
        try:
            return builtin_techniques()
        except _Unreadable:
            pass
    from reslab.nn.techniques import list_techniques, technique_class

    return [(n, technique_class(n).summary, technique_class(n).reference) for n in list_techniques()]


def models() -> list[tuple[str, str]]:
    """``(name, family)`` of every registered model, in registration order."""
    if not _live():
        try:
            return builtin_models()
        except _Unreadable:
            pass
    from reslab.nn.models import list_models, model_family

    return [(n, model_family(n)) for n in list_models()]


def _live() -> bool:
    """Whether more than the built-ins may be registered: a registry is imported (anything may
    have registered since), or a plugin may add techniques."""
    if "reslab.nn.registry" in sys.modules or "reslab.nn.models" in sys.modules:
        return True
    from importlib.metadata import entry_points

    from reslab.nn.plugins import ENTRY_POINT_GROUP, env_modules

    return bool(env_modules()) or bool(list(entry_points(group=ENTRY_POINT_GROUP)))


def builtin_techniques(source: str | None = None) -> list[tuple[str, str, str]]:
    """``(name, summary, reference)`` of the techniques the source of :mod:`reslab.nn.techniques`
    (or ``source``) registers, in order, read without running it: the classes decorated with
    ``register`` and those passed to a module-level ``register(...)`` call."""
    text = (_HERE / "techniques.py").read_text(encoding="utf-8") if source is None else source
    body = ast.parse(text).body
    classes = {node.name: node for node in body if isinstance(node, ast.ClassDef)}
    out = []
    for node in body:
        if isinstance(node, ast.ClassDef) and any(_is_register(d) for d in node.decorator_list):
            out.append(_technique_fields(node, classes))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and _is_register(node.value.func):
            args = node.value.args
            if len(args) != 1 or not isinstance(args[0], ast.Name) or args[0].id not in classes:
                raise _Unreadable("register() of something other than a class of the module")
            out.append(_technique_fields(classes[args[0].id], classes))
    return out


def _is_register(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id == "register") or (
        isinstance(node, ast.Attribute) and node.attr == "register"
    )


def _technique_fields(cls: ast.ClassDef, classes: dict[str, ast.ClassDef]) -> tuple[str, str, str]:
    """The class's :data:`_FIELDS`, looked up as Python would through the bases defined in the
    module; the base ``Technique`` gives ``""`` for all but ``name``."""
    found: dict[str, str] = {}
    for c in _lineage(cls, classes):
        for stmt in c.body:
            name, value = _assigned(stmt)
            if name in _FIELDS and name not in found:
                if not (isinstance(value, ast.Constant) and isinstance(value.value, str)):
                    raise _Unreadable(f"{cls.name}.{name} is not a plain string")
                found[name] = value.value
    if not found.get("name"):
        raise _Unreadable(f"{cls.name} names itself some other way")
    return found["name"], found.get("summary", ""), found.get("reference", "")


def _assigned(stmt: ast.stmt) -> tuple[str, ast.expr | None]:
    """``(name, value)`` of a statement ``name = value`` or ``name: type = value``, else ``("", None)``."""
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
        return stmt.targets[0].id, stmt.value
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return stmt.target.id, stmt.value
    return "", None


def _lineage(cls: ast.ClassDef, classes: dict[str, ast.ClassDef]) -> list[ast.ClassDef]:
    """``cls`` and its bases defined in the module, nearest first (single inheritance only)."""
    out = [cls]
    while True:
        bases = out[-1].bases
        if len(bases) != 1 or not isinstance(bases[0], ast.Name):
            raise _Unreadable(f"{out[-1].name} has bases the catalog does not follow")
        if bases[0].id == "Technique":
            return out
        if bases[0].id not in classes:
            raise _Unreadable(f"{out[-1].name}'s base {bases[0].id} is defined elsewhere")
        out.append(classes[bases[0].id])


def builtin_models(source: str | None = None) -> list[tuple[str, str]]:
    """``(name, family)`` of the models the source of :mod:`reslab.nn.models` (or ``source``)
    registers, read without running it: ``resnet{depth}`` for each depth of its tables, the
    CIFAR family's (``CIFAR_DEPTHS``) then the ImageNet family's (``IMAGENET_LAYERS``), as
    ``_register_families`` registers them."""
    text = (_HERE / "models.py").read_text(encoding="utf-8") if source is None else source
    tree = ast.parse(text)
    # the two registrations of _register_families; any other is something only running it tells
    families = []
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "register_model":
            name, family = [*call.args, None, None][:2]
            if not isinstance(name, ast.JoinedStr) or not isinstance(family, ast.Constant):
                raise _Unreadable("a model is registered by name, not by a depth table")
            families.append(family.value)
    if families != ["cifar", "imagenet"]:
        raise _Unreadable(f"models are registered in the families {families}, not by the two depth tables")
    tables = dict(_assigned(node) for node in tree.body)
    try:
        cifar = ast.literal_eval(tables["CIFAR_DEPTHS"])
        imagenet = tables["IMAGENET_LAYERS"]
        if not isinstance(imagenet, ast.Dict):
            raise _Unreadable("IMAGENET_LAYERS is not a dict display")
        imagenet_depths = [ast.literal_eval(k) for k in imagenet.keys if k is not None]
    except (KeyError, TypeError, ValueError) as e:
        raise _Unreadable(f"the model tables are not literals: {e}") from None
    return [(f"resnet{d}", "cifar") for d in cifar] + [(f"resnet{d}", "imagenet") for d in imagenet_depths]


def __getattr__(name: str) -> Any:
    # reslab 0.2's tables (reslab.catalog.MODELS, .TECHNIQUES), now derived on each access
    if name == "MODELS":
        return tuple(models())
    if name == "TECHNIQUES":
        return tuple(techniques())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["builtin_models", "builtin_techniques", "models", "techniques"]
