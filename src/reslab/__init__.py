"""reslab: residual techniques for ResNets, measured honestly.

A residual block is branch + shortcut + merge; a *technique* decides the merge:

>>> import reslab
>>> model = reslab.build_model("resnet20", technique="scale", num_classes=10, in_channels=1)
>>> reslab.list_techniques()[:4]
['baseline', 'scale', 'norm', 'fusion']
>>> reslab.build_model("resnet18").fc.out_features  # ImageNet models: 1,000 classes
1000
"""

from reslab.blocks import BasicBlock, Bottleneck, DropPath, ResidualBlock, residual_blocks
from reslab.fuse import fuse
from reslab.models import ModelSpec, ResNet, build_model, cifar_resnet, list_models
from reslab.techniques import Technique, get_technique, list_techniques, register

__version__ = "0.1.0"

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
