"""List the registered models and techniques."""

from __future__ import annotations

import argparse

from reslab.models import list_models, model_family
from reslab.techniques import list_techniques, technique_class

NAME = "models"
HELP = "list models and techniques"
ORDER = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    print("models:")
    for name in list_models():
        print(f"  {name:<12} {model_family(name)}")
    print("  resnetD      cifar, for any other depth D = 6n+2 (e.g. resnet218)")
    print("\ntechniques:")
    for name in list_techniques():
        cls = technique_class(name)
        ref = f"  [{cls.reference}]" if cls.reference else ""
        print(f"  {name:<11} {cls.summary}{ref}")
    return 0
