"""List the built-in models and techniques."""

from __future__ import annotations

import argparse

from reslab.catalog import MODELS, TECHNIQUES

NAME = "models"
HELP = "list models and techniques"
ORDER = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    print("models:")
    for name, family in MODELS:
        print(f"  {name:<12} {family}")
    print("  resnetD      cifar, for any other depth D = 6n+2 (e.g. resnet218)")
    print("\ntechniques:")
    for name, summary, reference in TECHNIQUES:
        print(f"  {name:<11} {summary}  [{reference}]")
    return 0
