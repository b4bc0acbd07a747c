"""reslab: residual techniques for ResNets, measured honestly.

A residual block is branch + shortcut + merge; a *technique* decides the merge:

>>> import reslab
>>> model = reslab.build_model("resnet20", technique="scale", num_classes=10, in_channels=1)
>>> reslab.list_techniques()[:4]
['baseline', 'scale', 'norm', 'fusion']
>>> reslab.build_model("resnet18").fc.out_features  # ImageNet models: 1,000 classes
1000

The names below are imported on first use, so ``import reslab`` (and ``reslab --help``)
does not load torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> module that defines it
_LAZY = {
    "BasicBlock": "reslab.blocks",
    "Bottleneck": "reslab.blocks",
    "DropPath": "reslab.blocks",
    "ResidualBlock": "reslab.blocks",
    "residual_blocks": "reslab.blocks",
    "fuse": "reslab.fuse",
    "ModelSpec": "reslab.models",
    "ResNet": "reslab.models",
    "build_model": "reslab.models",
    "cifar_resnet": "reslab.models",
    "list_models": "reslab.models",
    "Technique": "reslab.techniques",
    "get_technique": "reslab.techniques",
    "list_techniques": "reslab.techniques",
    "register": "reslab.techniques",
}

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "DropPath",
    "ModelSpec",
    "ResNet",
    "ResidualBlock",
    "Technique",
    "build_model",
    "cifar_resnet",
    "fuse",
    "get_technique",
    "list_models",
    "list_techniques",
    "register",
    "residual_blocks",
]

if TYPE_CHECKING:
    from reslab.blocks import BasicBlock, Bottleneck, DropPath, ResidualBlock, residual_blocks
    from reslab.fuse import fuse
    from reslab.models import ModelSpec, ResNet, build_model, cifar_resnet, list_models
    from reslab.techniques import Technique, get_technique, list_techniques, register


class _Package(types.ModuleType):
    """The package object. Importing the submodule ``reslab.fuse`` binds it as the
    attribute ``fuse``; the package's ``fuse`` is the function of that name (as when
    this file imported it eagerly), so that binding is turned into the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "fuse" and isinstance(value, types.ModuleType):
            value = value.fuse
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'reslab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
