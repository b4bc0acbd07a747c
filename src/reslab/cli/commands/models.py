"""List the models and techniques (built-in, and any a plugin or --import adds)."""

from __future__ import annotations

import argparse

from reslab.nn import catalog

NAME = "models"
HELP = "list models and techniques"
ORDER = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    print("models:")
    for name, family in catalog.models():
        print(f"  {name:<12} {family}")
    print("  resnetD      cifar, for any other depth D = 6n+2 (e.g. resnet218)")
    print("\ntechniques:")
    for name, summary, reference in catalog.techniques():
        print(f"  {name:<11} {summary}" + (f"  [{reference}]" if reference else ""))
    return 0
