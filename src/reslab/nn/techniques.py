"""The built-in techniques: the plain merge, the article's three, and the well-founded ones.

Also the technique API in one place (:class:`Technique`, :func:`register`,
:func:`get_technique`, ...): importing this module registers the built-ins first, so a
lookup through it always sees them. See :mod:`reslab.nn.technique` for the contract.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reslab.errors import UsageError
from reslab.nn.folding import FOLD_DTYPE, MergeFold, bn_affine, scalar
from reslab.nn.ops import add_scaled, fused_concat_conv1x1
from reslab.nn.registry import (
    get_technique,
    list_techniques,
    parse_techniques,
    register,
    registered,
    technique_class,
)
from reslab.nn.technique import FunctionChanged, Technique, check_foldable, merge_fold

# ---------------------------------------------------------------------------------------
# The plain merge and the article's three techniques.


@register
class Baseline(Technique):
    name = "baseline"
    summary = "F(x) + s"
    reference = "He et al. 2016, Deep Residual Learning"


@register
class ResidualScaling(Technique):
    name = "scale"
    summary = "F(x) + scale * s, scalar scale (init 1)"
    reference = "source article, technique 1 (scales the shortcut, not the branch)"
    parameter_names = ("scale",)

    def add_parameters(self, block: nn.Module, channels: int) -> None:
        block.scale = nn.Parameter(torch.ones(1))

    def merge(self, block: nn.Module, branch: Tensor, shortcut: Tensor) -> Tensor:
        return add_scaled(branch, block.scale, shortcut)

    def fold_merge(self, block: nn.Module, channels: int) -> MergeFold:
        return MergeFold(coef=scalar(block.scale))

    def from_plain(self, block: nn.Module) -> dict[str, str]:
        block.scale.fill_(1.0)
        return {"scale": "1: F(x) + s"}


@register
class ResidualNormalization(Technique):
    name = "norm"
    summary = "F(x) + BN(F(x) - s)"
    reference = "source article, technique 2 (no plain identity path)"
    parameter_names = ("residual_norm",)

    def add_parameters(self, block: nn.Module, channels: int) -> None:
        block.residual_norm = nn.BatchNorm2d(channels)

    def merge(self, block: nn.Module, branch: Tensor, shortcut: Tensor) -> Tensor:
        # The BN output is not saved for its backward, so the add can reuse its storage.
        return block.residual_norm(branch - shortcut).add_(branch)

    def fold_merge(self, block: nn.Module, channels: int) -> MergeFold:
        # F + a (F - s) + b = (1 + a) F - a s + b, with BN(x) = a x + b per channel.
        a, b = bn_affine(block.residual_norm)
        return MergeFold(gain=1 + a, coef=-a, shift=b)

    def from_plain(self, block: nn.Module) -> dict[str, str]:
        # it would need BN(F - s) = s for every F: no BatchNorm setting does that
        raise FunctionChanged("F(x) + BN(F(x) - s) equals F(x) + s for no BatchNorm setting")


@register
class FeatureFusion(Technique):
    name = "fusion"
    summary = "F(x) + Conv1x1(cat[F(x), s])"
    reference = "source article, technique 3 (no plain identity path)"
    parameter_names = ("feature_fusion",)

    def add_parameters(self, block: nn.Module, channels: int) -> None:
        block.feature_fusion = nn.Conv2d(2 * channels, channels, kernel_size=1)

    def init_block(self, block: nn.Module, num_blocks: int) -> None:
        # The article keeps PyTorch's default init for the fusion conv.
        block.feature_fusion.reset_parameters()

    def merge(self, block: nn.Module, branch: Tensor, shortcut: Tensor) -> Tensor:
        return fused_concat_conv1x1(
            branch, shortcut, block.feature_fusion.weight, block.feature_fusion.bias, add_identity=True
        )

    def fold_merge(self, block: nn.Module, channels: int) -> MergeFold:
        # F + W [F; s] + b = (I + W_F) F + W_s s + b: two channel-mixing matrices.
        ff = block.feature_fusion
        if type(ff) is not nn.Conv2d or tuple(ff.kernel_size) != (1, 1) or ff.groups != 1:
            raise UsageError("cannot fuse a feature_fusion layer that is not a plain 1x1 conv")
        w = ff.weight.detach().to(FOLD_DTYPE).reshape(channels, 2 * channels)
        b = ff.bias.detach().to(FOLD_DTYPE) if ff.bias is not None else 0.0
        eye = torch.eye(channels, dtype=FOLD_DTYPE, device=w.device)
        return MergeFold(gain=eye + w[:, :channels], coef=w[:, channels:].clone(), shift=b)

    def from_plain(self, block: nn.Module) -> dict[str, str]:
        conv = block.feature_fusion
        c = conv.out_channels
        conv.weight.zero_()
        conv.weight[:, c:, 0, 0].copy_(torch.eye(c, dtype=conv.weight.dtype))
        if conv.bias is not None:
            conv.bias.zero_()
        return {"feature_fusion": "weight [0 | I], bias 0: F(x) + s"}


@register
class SkipInit(Technique):
    name = "skipinit"
    summary = "s + alpha * F(x), scalar alpha (init 0)"
    reference = "De & Smith 2020 (SkipInit); Bachlechner et al. 2020 (ReZero)"
    parameter_names = ("alpha",)

    def add_parameters(self, block: nn.Module, channels: int) -> None:
        block.alpha = nn.Parameter(torch.zeros(1))

    def merge(self, block: nn.Module, branch: Tensor, shortcut: Tensor) -> Tensor:
        return add_scaled(shortcut, block.alpha, branch)

    def branch_gain(self, block: nn.Module) -> Tensor:
        return block.alpha

    def fold_merge(self, block: nn.Module, channels: int) -> MergeFold:
        return MergeFold(gain=scalar(block.alpha))

    def from_plain(self, block: nn.Module) -> dict[str, str]:
        block.alpha.fill_(1.0)  # its usual init, 0, would switch the pretrained branch off
        return {"alpha": "1: s + F(x)"}


@register
class LayerScale(Technique):
    name = "layerscale"
    summary = "s + gamma * F(x), per-channel gamma (init 1e-6)"
    reference = "Touvron et al. 2021 (CaiT); ConvNeXt uses init 1e-6"
    parameter_names = ("gamma",)

    def __init__(self, init_value: float = 1e-6) -> None:
        if not (isinstance(init_value, (int, float)) and math.isfinite(init_value)):
            raise ValueError(f"layerscale init_value must be a finite number, not {init_value!r}")
        self.init_value = float(init_value)

    def add_parameters(self, block: nn.Module, channels: int) -> None:
        block.gamma = nn.Parameter(torch.full((channels, 1, 1), self.init_value))

    def merge(self, block: nn.Module, branch: Tensor, shortcut: Tensor) -> Tensor:
        return add_scaled(shortcut, block.gamma, branch)

    def branch_gain(self, block: nn.Module) -> Tensor:
        return block.gamma

    def fold_merge(self, block: nn.Module, channels: int) -> MergeFold:
        return MergeFold(gain=block.gamma.detach().to(FOLD_DTYPE).reshape(-1))

    def __repr__(self) -> str:
        return f"LayerScale(init_value={self.init_value:g})"

    def from_plain(self, block: nn.Module) -> dict[str, str]:
        block.gamma.fill_(1.0)  # its usual init, 1e-6, would switch the pretrained branch off
        return {"gamma": "1: s + F(x)"}


@register
class ZeroInit(Technique):
    name = "zero_init"
    summary = "F(x) + s, last BN gamma of each branch initialised to 0"
    reference = "Goyal et al. 2017; torchvision zero_init_residual, timm zero_init_last"
    zero_init_last = True


def per_member(t: Tensor, k: int, ndim: int) -> Tensor:
    """A pack's stacked scalars (``k x 1``) shaped to broadcast over the ``B x k x C x ...`` view
    of its activations, each member's over its own channels."""
    return t.view(1, k, *([1] * (ndim - 1)))


class _GroupedFixupBias(nn.Module):
    """:class:`FixupBias` of ``k`` members of a pack (their biases stacked, ``k x 1``)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.bias = nn.Parameter(torch.empty(k, 1, device="meta"))

    def forward(self, x: Tensor) -> Tensor:
        return (x.unflatten(1, (self.k, -1)) + per_member(self.bias, self.k, x.ndim)).flatten(1, 2)


class _GroupedFixupScaleBias(nn.Module):
    """:class:`FixupScaleBias` of ``k`` members of a pack (scales and biases stacked, ``k x 1``)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.scale = nn.Parameter(torch.empty(k, 1, device="meta"))
        self.bias = nn.Parameter(torch.empty(k, 1, device="meta"))

    def forward(self, x: Tensor) -> Tensor:
        k, n = self.k, x.ndim
        return torch.addcmul(
            per_member(self.bias, k, n), x.unflatten(1, (k, -1)), per_member(self.scale, k, n)
        ).flatten(1, 2)


class _GroupedBiasedConv2d(nn.Module):
    """:class:`BiasedConv2d` of ``k`` members of a pack: each member's input shifted by its own
    scalar, then one convolution with ``k`` times the groups (weights stacked ``k x O x I x h x w``)."""

    def __init__(self, conv: BiasedConv2d, k: int) -> None:
        super().__init__()
        self.k = k
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.weight = nn.Parameter(torch.empty(k, *conv.weight.shape, device="meta"))
        self.bias = nn.Parameter(torch.empty(k, conv.out_channels, device="meta")) if conv.bias is not None else None
        self.input_bias = nn.Parameter(torch.empty(k, 1, device="meta"))

    def forward(self, x: Tensor) -> Tensor:
        x = (x.unflatten(1, (self.k, -1)) + per_member(self.input_bias, self.k, x.ndim)).flatten(1, 2)
        bias = self.bias.flatten() if self.bias is not None else None
        w = self.weight.flatten(0, 1)
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups * self.k)


class FixupBias(nn.Module):
    """A learnable scalar bias (Fixup's replacement for a BN shift)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias

    def grouped(self, k: int) -> nn.Module:
        """This layer for ``k`` members of a pack (:mod:`reslab.engine.packed.grouped`)."""
        return _GroupedFixupBias(k)

    def fold_affine(self, channels: int) -> tuple[Tensor, Tensor]:
        """This layer as ``scale * x + shift`` per channel, in float64 (for ``reslab fuse``)."""
        b = scalar(self.bias)
        return torch.ones(channels, dtype=FOLD_DTYPE, device=b.device), b.expand(channels)


class FixupScaleBias(nn.Module):
    """A learnable scalar multiplier and bias at the end of a Fixup branch."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.bias, x, self.scale)

    def grouped(self, k: int) -> nn.Module:
        """This layer for ``k`` members of a pack (:mod:`reslab.engine.packed.grouped`)."""
        return _GroupedFixupScaleBias(k)

    def fold_affine(self, channels: int) -> tuple[Tensor, Tensor]:
        """This layer as ``scale * x + shift`` per channel, in float64 (for ``reslab fuse``)."""
        return scalar(self.scale).expand(channels), scalar(self.bias).expand(channels)


class BiasedConv2d(nn.Conv2d):
    """A conv whose input is shifted by a learnable scalar first (Fixup's pre-conv bias)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.input_bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x + self.input_bias)

    def grouped(self, k: int) -> nn.Module:
        """This conv for ``k`` members of a pack (:mod:`reslab.engine.packed.grouped`)."""
        if self.padding_mode != "zeros":
            raise ValueError(f"a pack's convs pad with zeros, not {self.padding_mode!r}")
        return _GroupedBiasedConv2d(self, k)

    def fold_input_shift(self) -> float:
        """The constant this conv adds to its input first (for ``reslab fuse``)."""
        return float(scalar(self.input_bias))


@register
class Fixup(Technique):
    """Fixup (Zhang et al. 2019): train without normalization.

    Every BatchNorm becomes a scalar bias (the last one of each branch a scalar
    multiplier and bias), each conv of a branch gets a scalar input bias, the last conv
    of each branch starts at zero, the other branch convs are He-initialised and scaled
    by ``L ** (-1 / (2m - 2))`` (L residual branches, m layers per branch) and the
    classifier starts at zero.
    """

    name = "fixup"
    summary = "no normalization; scalar biases and multiplier; rescaled init"
    reference = "Zhang, Dauphin & Ma 2019, Fixup Initialization"
    normalized = False

    def norm(self, channels: int) -> nn.Module:
        return FixupBias()

    def last_norm(self, channels: int) -> nn.Module:
        return FixupScaleBias()

    def conv(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, bias: bool) -> nn.Conv2d:
        return BiasedConv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)

    def init_block(self, block: nn.Module, num_blocks: int) -> None:
        convs = block.branch_convs()
        m = len(convs)
        factor = num_blocks ** (-1.0 / (2 * m - 2))
        for conv in convs[:-1]:
            # He normal for the fan-in, as in the paper's reference code, then rescaled.
            std = math.sqrt(2.0 / (conv.weight.shape[1] * conv.weight[0, 0].numel())) * factor
            nn.init.normal_(conv.weight, mean=0.0, std=std)
        nn.init.zeros_(convs[-1].weight)

    def init_model(self, model: nn.Module) -> None:
        fc = getattr(model, "fc", None)
        if isinstance(fc, nn.Linear):
            nn.init.zeros_(fc.weight)
            nn.init.zeros_(fc.bias)

    def from_plain(self, block: nn.Module) -> dict[str, str]:
        raise UsageError(
            "cannot load a pretrained ResNet into technique 'fixup': it has no normalization layers to take the "
            "backbone's BatchNorm weights"
        )


@register
class PreActivation(Technique):
    name = "preact"
    summary = "s + F(x) with F = (BN-ReLU-conv) x 2, no ReLU after the merge"
    reference = "He et al. 2016, Identity Mappings in Deep Residual Networks"
    preact = True

    def from_plain(self, block: nn.Module) -> dict[str, str]:
        raise UsageError(
            "cannot load a pretrained ResNet into technique 'preact': its blocks apply BatchNorm and ReLU before "
            "each conv, a different function from the backbone's"
        )


__all__ = [
    "FunctionChanged",
    "Technique",
    "check_foldable",
    "get_technique",
    "list_techniques",
    "merge_fold",
    "parse_techniques",
    "register",
    "registered",
    "technique_class",
]
