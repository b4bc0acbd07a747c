"""List the models and techniques (built-in, and any a plugin or --import adds)."""

from __future__ import annotations

import argparse

from reslab.nn.catalog import MODELS, TECHNIQUES

NAME = "models"
HELP = "list models and techniques"
ORDER = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _plugins_present() -> bool:
    """Whether techniques from outside the package may exist (then the live registry is listed)."""
    from importlib.metadata import entry_points

    from reslab.nn.plugins import env_modules

    return bool(env_modules()) or bool(list(entry_points(group="reslab.techniques")))


def _techniques() -> list[tuple[str, str, str]]:
    if not _plugins_present():
        return list(TECHNIQUES)  # the checked static table: no torch import for a listing
    from reslab.nn.techniques import list_techniques, technique_class

    return [(n, technique_class(n).summary, technique_class(n).reference) for n in list_techniques()]


def run(args: argparse.Namespace) -> int:
    print("models:")
    for name, family in MODELS:
        print(f"  {name:<12} {family}")
    print("  resnetD      cifar, for any other depth D = 6n+2 (e.g. resnet218)")
    print("\ntechniques:")
    for name, summary, reference in _techniques():
        print(f"  {name:<11} {summary}" + (f"  [{reference}]" if reference else ""))
    return 0
