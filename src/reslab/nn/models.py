"""ResNet families built from :mod:`reslab.nn.blocks`, registered once and built by name.

* CIFAR-style (He et al. 2016, section 4.2): a 3x3 stem and three stages of ``n``
  BasicBlocks at widths 16/32/64 (times ``width``), depth ``6n + 2``: ``resnet20/32/44/
  56/110/1202``, and any other ``6n + 2`` depth through :func:`cifar_resnet`. Shortcuts
  that change shape are projections (torchvision's option B), not zero padding.
* ImageNet-style: torchvision's ``resnet18/34/50/101/152``, with its state-dict names, so
  ``build_model("resnet50", num_classes=1000).load_state_dict(torchvision.models.resnet50().state_dict())``
  works, and ``build_model("resnet50", technique="scale", weights=...)`` puts pretrained
  weights under a technique (:mod:`reslab.nn.pretrained`).

Every model takes a technique and the options of :class:`ResNet`; ``model.spec`` records
what is needed to build it again (checkpoints store it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reslab.nn.blocks import BasicBlock, Bottleneck, ResidualBlock, block_normalizes_input, projection
from reslab.nn.techniques import Technique, get_technique


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model: ``build_model(**spec.as_kwargs())``."""

    name: str
    technique: str = "baseline"
    num_classes: int = 10
    in_channels: int = 3
    options: dict[str, Any] = field(default_factory=dict)

    def as_kwargs(self) -> dict[str, Any]:
        d = asdict(self)
        opts = d.pop("options")
        return {**d, **opts}


class ResNet(nn.Module):
    """A ResNet whose blocks all use one technique.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage.
        widths: base width of each stage (``planes`` for Bottleneck).
        stem: ``"cifar"`` (3x3 conv, stride 1) or ``"imagenet"`` (7x7 stride 2 + max pool).
        width: multiplier applied to every stage width and the stem.
        drop_path_rate: stochastic depth rate of the last block; earlier blocks get a
            linearly smaller rate (Huang et al. 2016).
        zero_init_last, conv_bias, technique_args: passed to every block.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        technique: str | Technique = "baseline",
        stem: str = "cifar",
        width: float = 1.0,
        drop_path_rate: float = 0.0,
        zero_init_last: bool | None = None,
        conv_bias: bool = False,
        technique_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        if num_classes < 1 or in_channels < 1:
            raise ValueError("num_classes and in_channels must be positive")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        tech = get_technique(technique, **(technique_args or {}))
        self.technique = tech
        widths = [max(1, round(w * width)) for w in widths]
        stem_width = widths[0] if stem == "cifar" else max(1, round(64 * width))
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, stem_width, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False)
        # Blocks that normalize their own input (pre-activation) need no norm in the stem.
        prenorm = block_normalizes_input(tech)
        self.bn1 = nn.Identity() if prenorm else tech.norm(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()

        num_blocks = sum(layers)
        channels = stem_width
        index = 0
        for stage, (n, w) in enumerate(zip(layers, widths, strict=True)):
            stride = 1 if stage == 0 else 2
            blocks: list[nn.Module] = []
            for i in range(n):
                out = w * block.expansion
                s = stride if i == 0 else 1
                down = projection(channels, out, s, tech) if (s != 1 or channels != out) else None
                rate = drop_path_rate * (index + 1) / num_blocks
                blocks.append(
                    block(
                        channels,
                        w,
                        stride=s,
                        downsample=down,
                        technique=tech,
                        conv_bias=conv_bias,
                        drop_path_rate=rate,
                        zero_init_last=zero_init_last,
                        num_blocks=num_blocks,
                        init=False,  # once, by _init_weights, after the He init it would undo
                    )
                )
                channels = out
                index += 1
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        # Such blocks leave their output un-normalized: finish with BN-ReLU.
        self.final_norm = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True)) if prenorm else None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels
        self._init_weights(num_blocks)

    def _init_weights(self, num_blocks: int) -> None:
        """The model's one initialisation: torchvision's (He normal, fan_out, for convs; BN at
        identity), then each block's technique rule, then the technique's model-level rule."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResidualBlock):
                m.init_weights(num_blocks)
        self.technique.init_model(self)

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    # timm's names: forward_features gives the last feature map (N x num_features x H x W),
    # forward_head pools it and applies the classifier (or stops before it).

    def forward_features(self, x: Tensor) -> Tensor:
        """The feature map before pooling (after the final norm-ReLU of a pre-activation net)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages():
            x = stage(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pool and classifier; ``pre_logits=True`` returns the pooled features."""
        x = self.avgpool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The classifier layer (``fc``, torchvision's name)."""
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a new one for ``num_classes`` (fine-tuning)."""
        self.fc = nn.Linear(self.num_features, num_classes)
        spec = getattr(self, "spec", None)
        if isinstance(spec, ModelSpec):
            self.spec = ModelSpec(spec.name, spec.technique, num_classes, spec.in_channels, dict(spec.options))


# ---------------------------------------------------------------------------------------
# Registry of named models.

_MODELS: dict[str, Callable[..., ResNet]] = {}
_FAMILY: dict[str, str] = {}

IMAGENET_LAYERS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
#: default classifier sizes: ImageNet's 1,000 classes, or the 10 of CIFAR-10 and Fashion-MNIST.
IMAGENET_CLASSES = 1000
CIFAR_CLASSES = 10


def register_model(name: str, family: str) -> Callable[[Callable[..., ResNet]], Callable[..., ResNet]]:
    def deco(fn: Callable[..., ResNet]) -> Callable[..., ResNet]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = fn
        _FAMILY[name] = family
        return fn

    return deco


def cifar_resnet(depth: int, **kwargs: Any) -> ResNet:
    """CIFAR-style ResNet of any depth ``6n + 2`` (BasicBlocks, 3 stages)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR-style ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {depth}")
    n = (depth - 2) // 6
    return ResNet(BasicBlock, (n, n, n), (16, 32, 64), stem="cifar", **kwargs)


def imagenet_resnet(depth: int, **kwargs: Any) -> ResNet:
    """torchvision's ImageNet ResNet of depth 18, 34, 50, 101 or 152 (1,000 classes unless given)."""
    kwargs.setdefault("num_classes", IMAGENET_CLASSES)
    if depth not in IMAGENET_LAYERS:
        raise ValueError(f"ImageNet-style ResNet depth must be one of {sorted(IMAGENET_LAYERS)}, got {depth}")
    block, layers = IMAGENET_LAYERS[depth]
    return ResNet(block, layers, (64, 128, 256, 512), stem="imagenet", **kwargs)


def _register_families() -> None:
    for d in CIFAR_DEPTHS:
        register_model(f"resnet{d}", "cifar")(lambda d=d, **kw: cifar_resnet(d, **kw))
    for d in IMAGENET_LAYERS:
        register_model(f"resnet{d}", "imagenet")(lambda d=d, **kw: imagenet_resnet(d, **kw))


_register_families()


def list_models() -> list[str]:
    """Registered model names. ``resnetD`` for any other ``D = 6n + 2`` also builds."""
    return list(_MODELS)


def model_family(name: str) -> str:
    """``"cifar"`` or ``"imagenet"`` for a buildable model name."""
    _constructor(name)
    return _FAMILY.get(name, "cifar")


def _constructor(name: str) -> Callable[..., ResNet]:
    if name in _MODELS:
        return _MODELS[name]
    m = re.fullmatch(r"resnet(\d+)", name)
    if m and int(m.group(1)) >= 8 and (int(m.group(1)) - 2) % 6 == 0:
        depth = int(m.group(1))
        return lambda **kw: cifar_resnet(depth, **kw)
    raise ValueError(
        f"unknown model {name!r}; valid models: {', '.join(_MODELS)} (or resnetD for any CIFAR depth D = 6n+2)"
    )


def build_model(
    name: str,
    technique: str | Technique = "baseline",
    num_classes: int | None = None,
    in_channels: int = 3,
    weights: str | Path | Mapping[str, Tensor] | None = None,
    **options: Any,
) -> ResNet:
    """Build a registered model with a technique.

    ``num_classes`` defaults to 1,000 for the ImageNet family (as torchvision's, so its
    weights load as they are) and 10 for the CIFAR family. ``options`` are :class:`ResNet`
    arguments: ``width``, ``drop_path_rate``, ``zero_init_last``, ``conv_bias``,
    ``technique_args``.

    ``weights`` (a file or a state dict of a plain ResNet of the same architecture:
    torchvision's, timm's, or a reslab run's) are loaded into the backbone, and the
    technique's own parameters are set to keep the backbone's function where the
    technique allows it (see :mod:`reslab.nn.pretrained`). No weights are downloaded: pass
    e.g. ``torchvision.models.resnet50(weights="DEFAULT").state_dict()``. What was loaded
    and what was newly initialised is in ``model.pretrained_report``. Without
    ``weights`` the model is freshly initialised.
    """
    ctor = _constructor(name)
    if num_classes is None:
        num_classes = IMAGENET_CLASSES if model_family(name) == "imagenet" else CIFAR_CLASSES
    allowed = {"width", "drop_path_rate", "zero_init_last", "conv_bias", "technique_args"}
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"unknown model options {sorted(unknown)}; valid: {sorted(allowed)}")
    model = ctor(technique=technique, num_classes=num_classes, in_channels=in_channels, **options)
    tech_name = technique if isinstance(technique, str) else technique.name
    model.spec = ModelSpec(name, tech_name, num_classes, in_channels, dict(options))
    if weights is not None:
        from reslab.nn.pretrained import load_pretrained

        model.pretrained_report = load_pretrained(model, weights)
    return model


def channels_last_safe(model: nn.Module, device: str | torch.device = "cpu") -> bool:
    """Whether ``model`` may run in channels_last memory on ``device``.

    False on the CPU when the model has a 1x1 stride-2 convolution with 2 to 7 input
    channels: with torch 2.14.1 on an AVX2-only CPU (AMD EPYC, no AVX-512), oneDNN's
    channels_last backward of such a convolution corrupts the heap (SIGSEGV, SIGBUS or
    "free(): invalid next size"), always with one thread and sometimes with two. Reduced-width
    CIFAR ResNets have exactly such projection shortcuts (width 0.25: 4 -> 8 channels). NCHW
    computes the same function through other kernels, so callers fall back to it.
    """
    if torch.device(device).type != "cpu":
        return True
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1 and 1 < m.in_channels < 8:
            return False
    return True


def fast_memory_format(model: nn.Module, device: str | torch.device = "cpu") -> torch.memory_format:
    """channels_last (the faster layout for convolutions, same maths) where
    :func:`channels_last_safe` allows it, else the contiguous NCHW layout."""
    return torch.channels_last if channels_last_safe(model, device) else torch.contiguous_format
