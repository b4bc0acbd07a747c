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
import importlib.abc
import importlib.machinery
import sys
import types
from typing import TYPE_CHECKING, Any

from reslab.version import __version__ as __version__

#: public name -> module that defines it
_LAZY = {
    "BasicBlock": "reslab.nn.blocks",
    "Bottleneck": "reslab.nn.blocks",
    "DropPath": "reslab.nn.blocks",
    "ResidualBlock": "reslab.nn.blocks",
    "residual_blocks": "reslab.nn.blocks",
    "fuse": "reslab.deploy.fuse",
    "ModelSpec": "reslab.nn.models",
    "ResNet": "reslab.nn.models",
    "build_model": "reslab.nn.models",
    "cifar_resnet": "reslab.nn.models",
    "list_models": "reslab.nn.models",
    "Technique": "reslab.nn.techniques",
    "get_technique": "reslab.nn.techniques",
    "list_techniques": "reslab.nn.techniques",
    "register": "reslab.nn.techniques",
    "MergeFold": "reslab.nn.folding",
    "Results": "reslab.api",
    "compare": "reslab.api",
    "load": "reslab.api",
    "read_results": "reslab.api",
    "save_fused": "reslab.deploy.fused",
}

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "DropPath",
    "MergeFold",
    "ModelSpec",
    "ResNet",
    "ResidualBlock",
    "Results",
    "Technique",
    "build_model",
    "cifar_resnet",
    "compare",
    "fuse",
    "get_technique",
    "list_models",
    "list_techniques",
    "load",
    "read_results",
    "register",
    "residual_blocks",
    "save_fused",
]

if TYPE_CHECKING:
    from reslab.api import Results, compare, load, read_results
    from reslab.deploy.fuse import fuse
    from reslab.deploy.fused import save_fused
    from reslab.nn.blocks import BasicBlock, Bottleneck, DropPath, ResidualBlock, residual_blocks
    from reslab.nn.folding import MergeFold
    from reslab.nn.models import ModelSpec, ResNet, build_model, cifar_resnet, list_models
    from reslab.nn.techniques import Technique, get_technique, list_techniques, register


#: module paths of reslab 0.2, which plugins may import, -> where that code lives now
_MOVED = {
    "reslab.techniques": "reslab.nn.techniques",
    "reslab.folding": "reslab.nn.folding",
    "reslab.blocks": "reslab.nn.blocks",
    "reslab.models": "reslab.nn.models",
    "reslab.catalog": "reslab.nn.catalog",
    "reslab.describe": "reslab.nn.describe",
    "reslab.normalize": "reslab.nn.normalize",
    "reslab.plugins": "reslab.nn.plugins",
    "reslab.pretrained": "reslab.nn.pretrained",
    "reslab.config": "reslab.engine.config",
    "reslab.data": "reslab.engine.data",
    "reslab.runs": "reslab.engine.runs",
    "reslab.timing": "reslab.engine.timing",
    "reslab.train": "reslab.engine.train",
    "reslab.checkpoint": "reslab.engine.checkpoint",
    "reslab.export": "reslab.deploy.export",
    "reslab.fuse": "reslab.deploy.fuse",
    "reslab.probe_plots": "reslab.probe.plots",
    "reslab.aggregate": "reslab.report.aggregate",
    "reslab.plots": "reslab.report.figures",
    "reslab.run_report": "reslab.report.run_report",
    "reslab.claims": "reslab.study.claims",
    "reslab.compare": "reslab.study.compare",
    "reslab.decisions": "reslab.study.decisions",
    "reslab.results": "reslab.study.results",
    "reslab.stats": "reslab.study.stats",
    "reslab.launch": "reslab.study.launch",
}
#: 0.2 module paths that are also functions of 0.3 (``reslab.compare(...)``): the alias module is
#: callable, so importing the old path does not take the function away
_CALLABLE = {"reslab.compare": ("reslab.api", "compare"), "reslab.fuse": ("reslab.deploy.fuse", "fuse")}


class _MovedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import reslab.folding`` (0.2's path) gives the module now at ``reslab.nn.folding``:
    the same module object, so a technique registered through either name is one."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        target = importlib.import_module(_MOVED[spec.name])
        if spec.name in _CALLABLE:
            return _CallableModule(spec.name, target, *_CALLABLE[spec.name])
        return target

    def exec_module(self, module: Any) -> None:
        """The module ran when it was imported under its own name."""


class _CallableModule(types.ModuleType):
    """An old module path whose name is now a function: attributes come from the module that
    moved, a call goes to the function."""

    def __init__(self, name: str, target: Any, func_module: str, func_name: str) -> None:
        super().__init__(name, target.__doc__)
        self._target, self._func = target, (func_module, func_name)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._target, attr)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(self._func[0]), self._func[1])(*args, **kwargs)


if not any(isinstance(f, _MovedModule) for f in sys.meta_path):
    sys.meta_path.append(_MovedModule())


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'reslab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
