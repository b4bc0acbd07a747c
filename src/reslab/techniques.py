"""Residual techniques: how a block merges its branch ``F(x)`` with its shortcut ``s``.

A residual block (see :mod:`reslab.blocks`) computes a branch and a shortcut and hands
both to its technique's :meth:`Technique.merge`. A technique is a small stateless object:
it adds its parameters to the block (under the attribute names the source article uses,
so the article's state dicts load as they are), decides the merge, and where it must, the
branch's normalization layers and the initialisation, and states its merge's eval-mode
algebra (:meth:`Technique.fold_merge`) so that ``reslab fuse`` can fold it into plain
convolutions. Adding a technique means one class and one :func:`register` call, here or
in any module (loaded with ``--import MODULE`` or the ``reslab.techniques`` entry point,
see :mod:`reslab.plugins`); it then works in both block kinds, every model and command.

The merges are written for speed: one fused op where the arithmetic allows (``addcmul``
for the scalar and per-channel gains), and the multi-scale fusion computes its 1x1 conv on
``cat[F, s]`` as two half-width convs without materialising the concatenation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reslab.errors import UsageError
from reslab.folding import FOLD_DTYPE, MergeFold, bn_affine, fold_is_current, scalar

if TYPE_CHECKING:  # pragma: no cover
    from reslab.blocks import ResidualBlock


def _flat_same_order(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor] | None:
    """1-D views of ``a`` and ``b`` in their common memory order, if both are dense alike."""
    for fmt in (torch.contiguous_format, torch.channels_last):
        if a.is_contiguous(memory_format=fmt) and b.is_contiguous(memory_format=fmt):
            if fmt is torch.channels_last:
                a, b = a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1)
            return a.reshape(-1), b.reshape(-1)
    return None


def _gain_grad(g: Tensor, y: Tensor, gain: Tensor) -> Tensor:
    """Gradient of a broadcast gain in ``x + gain * y``: ``g * y`` summed to ``gain``'s shape.

    Written as reductions that read ``g`` and ``y`` once and write nothing of their size
    (a dot product for a scalar, BatchNorm's per-channel backward reduction for a
    per-channel gain) instead of autograd's product tensor followed by a sum.
    """
    g = g.to(y.dtype)
    if gain.numel() == 1:
        flat = _flat_same_order(g, y)
        total = flat[0].dot(flat[1]) if flat is not None else (g * y).sum()
        return total.reshape(gain.shape).to(gain.dtype)
    if y.dim() == 4 and gain.shape == (y.shape[1], 1, 1):
        c = y.shape[1]
        zeros = torch.zeros(c, dtype=y.dtype, device=y.device)
        ones = torch.ones(c, dtype=y.dtype, device=y.device)
        # sum(g * (y - mean) * invstd) per channel, with mean 0 and invstd 1.
        _, per_channel, _ = torch.ops.aten.native_batch_norm_backward(
            g, y, ones, None, None, zeros, ones, True, 0.0, [False, True, False]
        )
        return per_channel.reshape(gain.shape).to(gain.dtype)
    return (g * y).sum_to_size(gain.shape).to(gain.dtype)


class _AddScaled(torch.autograd.Function):
    """``x + gain * y`` for a scalar or per-channel ``gain`` (see :func:`add_scaled`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, gain: Tensor, y: Tensor) -> Tensor:
        ctx.save_for_backward(gain, y)
        return torch.addcmul(x, gain, y)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        gain, y = ctx.saved_tensors
        gx = g if ctx.needs_input_grad[0] else None
        gy = g * gain if ctx.needs_input_grad[2] else None
        gg = _gain_grad(g, y, gain) if ctx.needs_input_grad[1] else None
        return gx, gg, gy


def add_scaled(x: Tensor, gain: Tensor, y: Tensor) -> Tensor:
    """``x + gain * y``, ``gain`` broadcast (a scalar or ``C x 1 x 1``), with a lean backward.

    Autograd's ``addcmul`` backward materialises ``g * y`` to reduce it to the gain's
    shape: on a 2-core CPU that product cost about as much as the rest of the merge. Here
    the gain's gradient is a reduction that writes nothing activation-sized.
    """
    if torch.is_grad_enabled() and (gain.requires_grad or x.requires_grad or y.requires_grad):
        return _AddScaled.apply(x, gain, y)
    return torch.addcmul(x, gain, y)


class Technique:
    """Base class. The default is the plain residual merge ``F(x) + s`` of He et al."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    #: whether the branch uses BatchNorm (Fixup removes normalization).
    normalized: ClassVar[bool] = True
    #: pre-activation ordering BN -> ReLU -> conv, no ReLU after the merge.
    preact: ClassVar[bool] = False
    #: whether the last BN gamma of each branch starts at zero by default.
    zero_init_last: ClassVar[bool] = False
    #: names of the parameters/modules this technique adds to each block.
    parameter_names: ClassVar[tuple[str, ...]] = ()

    def add_parameters(self, block: ResidualBlock, channels: int) -> None:
        """Register the technique's parameters on ``block`` (``channels`` = block output)."""

    def merge(self, block: ResidualBlock, branch: Tensor, shortcut: Tensor) -> Tensor:
        """Combine branch output and shortcut, before the block's final activation."""
        return branch + shortcut

    def fold_merge(self, block: ResidualBlock, channels: int) -> MergeFold:
        """The eval-mode :meth:`merge` of ``block`` as ``gain * F + coef * s + shift``, in float64.

        ``reslab fuse`` folds this into the block's convolutions, so it must equal
        :meth:`merge` exactly in eval mode (``channels`` = block output channels). The
        default describes the plain merge ``F + s``; a technique that overrides
        :meth:`merge` must override this too, or ``fuse`` refuses it (see
        :func:`merge_fold`).
        """
        return MergeFold()

    def init_block(self, block: ResidualBlock, num_blocks: int) -> None:
        """Apply the technique's init rule after the generic (He) init of the block.

        ``num_blocks`` is the number of residual blocks in the whole network.
        """

    # Layers the block builds through the technique, so that Fixup can drop BatchNorm.
    def norm(self, channels: int) -> nn.Module:
        return nn.BatchNorm2d(channels)

    def last_norm(self, channels: int) -> nn.Module:
        return nn.BatchNorm2d(channels)

    def conv(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, bias: bool) -> nn.Conv2d:
        return nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            bias=bias,
        )

    def init_model(self, model: nn.Module) -> None:
        """Model-level init after every block has been initialised."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def check_foldable(technique: Technique) -> None:
    """Raise a :class:`~reslab.errors.UsageError` if ``fold_merge`` does not describe ``merge``.

    A subclass that overrides ``merge`` but inherits ``fold_merge`` would be folded as its
    parent's merge: that is an error naming the method to write, not a silently wrong model.
    """
    cls = type(technique)
    if not fold_is_current(technique, "merge", "fold_merge"):
        raise UsageError(
            f"cannot fuse technique {technique.name!r} ({cls.__name__}): it overrides merge() but not "
            f"fold_merge(); define {cls.__name__}.fold_merge(block, channels) returning a "
            "reslab.folding.MergeFold(gain, coef, shift) equal to its eval-mode merge"
        )


def merge_fold(technique: Technique, block: ResidualBlock, channels: int) -> MergeFold:
    """``technique.fold_merge(block, channels)``, after :func:`check_foldable`."""
    check_foldable(technique)
    return technique.fold_merge(block, channels)


_REGISTRY: dict[str, type[Technique]] = {}


def register(cls: type[Technique]) -> type[Technique]:
    """Class decorator: make a technique available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY:
        raise ValueError(f"technique {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def registered(cls: type[Technique]) -> bool:
    """Whether ``cls`` itself is in the registry."""
    return _REGISTRY.get(cls.name) is cls


def _load_plugins() -> None:
    # Techniques from outside the package (reslab.plugins): RESLAB_IMPORT modules and the
    # reslab.techniques entry points, loaded only when they are needed.
    from reslab.plugins import load_all

    load_all()


def list_techniques() -> list[str]:
    """Names of every registered technique (plugins included), in registration order."""
    _load_plugins()
    return list(_REGISTRY)


def technique_class(name: str) -> type[Technique]:
    """The technique class registered as ``name``, looking in the plugins when it is not found."""
    if name not in _REGISTRY:
        _load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = ", ".join(_REGISTRY)
        raise ValueError(
            f"unknown technique {name!r}; valid techniques: {valid} (a technique from another module loads with "
            "--import MODULE or the reslab.techniques entry point)"
        ) from None


def parse_techniques(spec: str | Sequence[str]) -> list[str]:
    """``"all"``, or technique names (a comma-separated string or a sequence; ``"all"`` may be
    one of them), validated against the registry, duplicates dropped, in the order given.

    The one parser of technique lists: ``compare`` and ``probe`` both use it.
    """
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError("no techniques given; name some, e.g. baseline,norm, or 'all'")
    out: list[str] = []
    for n in names:
        if n == "all":
            out += list_techniques()
        else:
            technique_class(n)  # raises ValueError listing the valid names
            out.append(n)
    return list(dict.fromkeys(out))


def get_technique(technique: str | Technique, **kwargs: Any) -> Technique:
    """Return a technique object from a name (``kwargs`` go to its constructor) or as is."""
    if isinstance(technique, Technique):
        if kwargs:
            raise ValueError("technique arguments can only be given with a technique name")
        return technique
    if not isinstance(technique, str):
        raise ValueError(f"technique must be a name or a Technique, not {type(technique).__name__}")
    cls = technique_class(technique)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"technique {technique!r} does not take arguments {sorted(kwargs)}: {e}") from None


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

    def add_parameters(self, block: ResidualBlock, channels: int) -> None:
        block.scale = nn.Parameter(torch.ones(1))

    def merge(self, block: ResidualBlock, branch: Tensor, shortcut: Tensor) -> Tensor:
        return add_scaled(branch, block.scale, shortcut)

    def fold_merge(self, block: ResidualBlock, channels: int) -> MergeFold:
        return MergeFold(coef=scalar(block.scale))


@register
class ResidualNormalization(Technique):
    name = "norm"
    summary = "F(x) + BN(F(x) - s)"
    reference = "source article, technique 2 (no plain identity path)"
    parameter_names = ("residual_norm",)

    def add_parameters(self, block: ResidualBlock, channels: int) -> None:
        block.residual_norm = nn.BatchNorm2d(channels)

    def merge(self, block: ResidualBlock, branch: Tensor, shortcut: Tensor) -> Tensor:
        # The BN output is not saved for its backward, so the add can reuse its storage.
        return block.residual_norm(branch - shortcut).add_(branch)

    def fold_merge(self, block: ResidualBlock, channels: int) -> MergeFold:
        # F + a (F - s) + b = (1 + a) F - a s + b, with BN(x) = a x + b per channel.
        a, b = bn_affine(block.residual_norm)
        return MergeFold(gain=1 + a, coef=-a, shift=b)


@register
class FeatureFusion(Technique):
    name = "fusion"
    summary = "F(x) + Conv1x1(cat[F(x), s])"
    reference = "source article, technique 3 (no plain identity path)"
    parameter_names = ("feature_fusion",)

    def add_parameters(self, block: ResidualBlock, channels: int) -> None:
        block.feature_fusion = nn.Conv2d(2 * channels, channels, kernel_size=1)

    def init_block(self, block: ResidualBlock, num_blocks: int) -> None:
        # The article keeps PyTorch's default init for the fusion conv.
        block.feature_fusion.reset_parameters()

    def merge(self, block: ResidualBlock, branch: Tensor, shortcut: Tensor) -> Tensor:
        return fused_concat_conv1x1(
            branch, shortcut, block.feature_fusion.weight, block.feature_fusion.bias, add_identity=True
        )

    def fold_merge(self, block: ResidualBlock, channels: int) -> MergeFold:
        # F + W [F; s] + b = (I + W_F) F + W_s s + b: two channel-mixing matrices.
        ff = block.feature_fusion
        if type(ff) is not nn.Conv2d or tuple(ff.kernel_size) != (1, 1) or ff.groups != 1:
            raise UsageError("cannot fuse a feature_fusion layer that is not a plain 1x1 conv")
        w = ff.weight.detach().to(FOLD_DTYPE).reshape(channels, 2 * channels)
        b = ff.bias.detach().to(FOLD_DTYPE) if ff.bias is not None else 0.0
        eye = torch.eye(channels, dtype=FOLD_DTYPE, device=w.device)
        return MergeFold(gain=eye + w[:, :channels], coef=w[:, channels:].clone(), shift=b)


def fused_concat_conv1x1(
    a: Tensor, b: Tensor, weight: Tensor, bias: Tensor | None, add_identity: bool = False
) -> Tensor:
    """``(a if add_identity else 0) + conv1x1(cat[a, b], weight, bias)`` without the cat.

    A 1x1 conv on a concatenation is ``W_a a + W_b b``: two half-width convs, the second
    accumulated in place into the first's output (conv backward needs its inputs, not its
    output, so this is safe for autograd). Adding ``a`` itself is folded into the weight as
    ``W_a + I``: a CxC add instead of a pass over the activations. On a 2-core CPU, with
    channels_last, this ran about 2x faster than cat + conv (forward and backward) and
    faster than the same two products written as GEMMs on the NHWC view.
    """
    c = a.shape[1]
    w_a, w_b = weight[:, :c], weight[:, c:]
    if add_identity:
        w_a = w_a + torch.eye(c, dtype=weight.dtype, device=weight.device)[:, :, None, None]
    return F.conv2d(a, w_a, bias).add_(F.conv2d(b, w_b))


# ---------------------------------------------------------------------------------------
# Known techniques for the same goal, for the comparison.


@register
class SkipInit(Technique):
    name = "skipinit"
    summary = "s + alpha * F(x), scalar alpha (init 0)"
    reference = "De & Smith 2020 (SkipInit); Bachlechner et al. 2020 (ReZero)"
    parameter_names = ("alpha",)

    def add_parameters(self, block: ResidualBlock, channels: int) -> None:
        block.alpha = nn.Parameter(torch.zeros(1))

    def merge(self, block: ResidualBlock, branch: Tensor, shortcut: Tensor) -> Tensor:
        return add_scaled(shortcut, block.alpha, branch)

    def fold_merge(self, block: ResidualBlock, channels: int) -> MergeFold:
        return MergeFold(gain=scalar(block.alpha))


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

    def add_parameters(self, block: ResidualBlock, channels: int) -> None:
        block.gamma = nn.Parameter(torch.full((channels, 1, 1), self.init_value))

    def merge(self, block: ResidualBlock, branch: Tensor, shortcut: Tensor) -> Tensor:
        return add_scaled(shortcut, block.gamma, branch)

    def fold_merge(self, block: ResidualBlock, channels: int) -> MergeFold:
        return MergeFold(gain=block.gamma.detach().to(FOLD_DTYPE).reshape(-1))

    def __repr__(self) -> str:
        return f"LayerScale(init_value={self.init_value:g})"


@register
class ZeroInit(Technique):
    name = "zero_init"
    summary = "F(x) + s, last BN gamma of each branch initialised to 0"
    reference = "Goyal et al. 2017; torchvision zero_init_residual, timm zero_init_last"
    zero_init_last = True


class FixupBias(nn.Module):
    """A learnable scalar bias (Fixup's replacement for a BN shift)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias

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

    def init_block(self, block: ResidualBlock, num_blocks: int) -> None:
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


@register
class PreActivation(Technique):
    name = "preact"
    summary = "s + F(x) with F = (BN-ReLU-conv) x 2, no ReLU after the merge"
    reference = "He et al. 2016, Identity Mappings in Deep Residual Networks"
    preact = True
