"""The built-in models and techniques as plain data, for ``reslab models``, which must
answer without importing torch. ``tests/test_startup.py`` checks this table against the
live registries (:func:`reslab.nn.models.list_models`, :func:`reslab.nn.techniques.list_techniques`):
registering or renaming a built-in means updating it."""

from __future__ import annotations

#: (name, family) of the registered models, in registration order
MODELS: tuple[tuple[str, str], ...] = (
    ("resnet20", "cifar"),
    ("resnet32", "cifar"),
    ("resnet44", "cifar"),
    ("resnet56", "cifar"),
    ("resnet110", "cifar"),
    ("resnet1202", "cifar"),
    ("resnet18", "imagenet"),
    ("resnet34", "imagenet"),
    ("resnet50", "imagenet"),
    ("resnet101", "imagenet"),
    ("resnet152", "imagenet"),
)

#: (name, summary, reference) of the built-in techniques, in registration order
TECHNIQUES: tuple[tuple[str, str, str], ...] = (
    ("baseline", "F(x) + s", "He et al. 2016, Deep Residual Learning"),
    (
        "scale",
        "F(x) + scale * s, scalar scale (init 1)",
        "source article, technique 1 (scales the shortcut, not the branch)",
    ),
    ("norm", "F(x) + BN(F(x) - s)", "source article, technique 2 (no plain identity path)"),
    ("fusion", "F(x) + Conv1x1(cat[F(x), s])", "source article, technique 3 (no plain identity path)"),
    (
        "skipinit",
        "s + alpha * F(x), scalar alpha (init 0)",
        "De & Smith 2020 (SkipInit); Bachlechner et al. 2020 (ReZero)",
    ),
    (
        "layerscale",
        "s + gamma * F(x), per-channel gamma (init 1e-6)",
        "Touvron et al. 2021 (CaiT); ConvNeXt uses init 1e-6",
    ),
    (
        "zero_init",
        "F(x) + s, last BN gamma of each branch initialised to 0",
        "Goyal et al. 2017; torchvision zero_init_residual, timm zero_init_last",
    ),
    (
        "fixup",
        "no normalization; scalar biases and multiplier; rescaled init",
        "Zhang, Dauphin & Ma 2019, Fixup Initialization",
    ),
    (
        "preact",
        "s + F(x) with F = (BN-ReLU-conv) x 2, no ReLU after the merge",
        "He et al. 2016, Identity Mappings in Deep Residual Networks",
    ),
)
