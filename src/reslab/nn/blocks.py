"""Residual blocks: branch + shortcut + merge.

:class:`BasicBlock` and :class:`Bottleneck` have torchvision's layout and state-dict names
(``conv1, bn1, conv2, bn2[, conv3, bn3], downsample.0, downsample.1``), so torchvision
weights load as they are. The technique (see :mod:`reslab.nn.techniques`) decides the merge,
adds its own parameters under the source article's names (``scale``, ``residual_norm``,
``feature_fusion``) and may replace the branch's normalization (Fixup) or its order
(pre-activation).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from reslab.caches import new_cache
from reslab.nn.folding import fold_is_current
from reslab.nn.ops import scaled_batch_norm
from reslab.nn.techniques import Technique, get_technique


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop the whole branch per sample in training.

    Kept samples are scaled by ``1 / (1 - p)`` so the expected branch is unchanged and
    evaluation needs no rescaling.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        return drop_path(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


def drop_path(x: Tensor, p: float, dims: int = 1) -> Tensor:
    """``x`` with each slice along its first ``dims`` dimensions (a sample; a sample of one
    run of a pack for ``dims=2``) kept with probability ``1 - p`` and scaled by
    ``1 / (1 - p)``, or dropped whole."""
    keep = 1.0 - p
    mask = x.new_empty(x.shape[:dims] + (1,) * (x.ndim - dims)).bernoulli_(keep)
    return x * mask.div_(keep)


_GAIN_DESCRIBES_MERGE: dict[type, bool] = new_cache("blocks.gain_describes_merge")


def _gain_describes_merge(technique: Technique) -> bool:
    """Whether the technique's ``branch_gain`` was written with (or after) its ``merge``: a
    subclass that changes the merge but inherits the gain would otherwise have its merge
    skipped. Once per technique class."""
    cls = type(technique)
    if cls not in _GAIN_DESCRIBES_MERGE:
        _GAIN_DESCRIBES_MERGE[cls] = fold_is_current(technique, "merge", "branch_gain")
    return _GAIN_DESCRIBES_MERGE[cls]


def _resolve(technique: str | Technique, technique_args: dict[str, Any] | None) -> Technique:
    return get_technique(technique, **(technique_args or {}))


def projection(
    in_channels: int, out_channels: int, stride: int, technique: str | Technique = "baseline"
) -> nn.Sequential:
    """The projection shortcut torchvision uses: 1x1 conv (+ BN when the technique has BN).

    Pre-activation blocks apply it to the already normalized input, so it has no BN.
    """
    tech = get_technique(technique)
    conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
    if tech.normalized and not tech.preact:
        return nn.Sequential(conv, nn.BatchNorm2d(out_channels))
    return nn.Sequential(conv)


class ResidualBlock(nn.Module):
    """Common machinery; subclasses build ``conv*``/``bn*`` and set ``_branch_depth``."""

    technique: Technique
    downsample: nn.Module | None

    def _setup(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        downsample: nn.Module | None,
        technique: Technique,
        drop_path_rate: float,
        zero_init_last: bool | None,
    ) -> None:
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if downsample is None and (stride != 1 or in_channels != out_channels):
            downsample = projection(in_channels, out_channels, stride, technique)
        self.downsample = downsample
        self.relu = nn.ReLU(inplace=True)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        if zero_init_last is None:
            zero_init_last = technique.zero_init_last
        if zero_init_last and not technique.normalized:
            raise ValueError(
                f"zero_init_last needs a BatchNorm at the end of the branch; technique "
                f"{technique.name!r} has none (it already starts its last conv at zero)"
            )
        if zero_init_last and technique.preact:
            raise ValueError(
                "zero_init_last needs a BatchNorm at the end of the branch; pre-activation "
                "blocks end their branch with a conv"
            )
        self.zero_init_last = zero_init_last
        technique.add_parameters(self, out_channels)

    def branch_convs(self) -> list[nn.Conv2d]:
        """The convolutions of the residual branch, in order."""
        return [getattr(self, f"conv{i}") for i in range(1, self._branch_depth + 1)]

    def last_norm_layer(self) -> nn.Module:
        """The normalization at the end of the branch (absent in pre-activation blocks)."""
        return getattr(self, f"bn{self._branch_depth}")

    # What a reader of the block's structure (the fuser) needs, so that the layer order of
    # each ordering is written down here only.

    def branch_layers(self) -> list[tuple[nn.Conv2d, nn.Module | None]]:
        """The branch as ``(conv, norm after it or None)`` pairs, in order.

        A ReLU sits between consecutive pairs. In a pre-activation block the norm at index
        ``i + 1`` follows conv ``i`` and the last conv has none (``bn1`` normalizes the
        block input, see :meth:`input_norm`).
        """
        convs = self.branch_convs()
        if self.technique.preact:
            norms: list[nn.Module | None] = [getattr(self, f"bn{i + 2}") for i in range(len(convs) - 1)]
            return list(zip(convs, [*norms, None], strict=True))
        return [(c, getattr(self, f"bn{i + 1}")) for i, c in enumerate(convs)]

    def input_norm(self) -> nn.Module | None:
        """The norm applied, then a ReLU, to the block input before the branch and a
        projection shortcut (pre-activation), or None when the input goes in as it is."""
        return self.bn1 if self.technique.preact else None

    def relu_after_merge(self) -> bool:
        """Whether a ReLU follows the merge (not in pre-activation blocks)."""
        return not self.technique.preact

    def init_weights(self, num_blocks: int = 1) -> None:
        """Apply the technique's init rule; ``num_blocks`` is the network's block count."""
        if self.zero_init_last:
            nn.init.zeros_(self.last_norm_layer().weight)
        self.technique.init_block(self, num_blocks)

    def forward(self, x: Tensor) -> Tensor:
        if self.technique.preact:
            pre = self.relu(self.bn1(x))
            shortcut = x if self.downsample is None else self.downsample(pre)
            branch = self.drop_path(self._preact_branch(pre))
            return self.technique.merge(self, branch, shortcut)
        shortcut = x if self.downsample is None else self.downsample(x)
        gain = self.norm_gain()
        branch = self.drop_path(self._branch(x, gain))
        if gain is not None:  # the branch is already g * F(x): the merge s + g * F(x) is an add
            return self.relu(branch + shortcut)
        return self.relu(self.technique.merge(self, branch, shortcut))

    def norm_gain(self) -> Tensor | None:
        """The technique's branch gain (:meth:`~reslab.nn.technique.Technique.branch_gain`)
        where this block computes it in the affine of its branch's last BatchNorm, else None.

        A merge ``s + g * F(x)`` costs an activation-sized multiply forward and two passes
        backward (the scaled gradient, the gain's reduction); scaling the BatchNorm's weight
        and bias by ``g`` instead costs a few hundred numbers, and autograd carries ``g``'s
        gradient through them. DropPath is linear, so it may come after. Under autocast the
        block's output keeps the branch's precision, as baseline's does (the merge's float32
        gain had promoted it to float32)."""
        if self.technique.preact or not _gain_describes_merge(self.technique):
            return None
        gain = self.technique.branch_gain(self)
        if gain is None:
            return None
        last = self.last_norm_layer()
        return gain if type(last) is nn.BatchNorm2d and last.weight is not None else None

    @staticmethod
    def _last_norm(bn: nn.Module, x: Tensor, gain: Tensor | None) -> Tensor:
        """``bn(x)``, the branch's last BatchNorm, times ``gain`` (a scalar or per channel) when given."""
        return bn(x) if gain is None else scaled_batch_norm(bn, x, gain.reshape(-1))

    def _branch(self, x: Tensor, gain: Tensor | None = None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _preact_branch(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"technique={self.technique!r}"


class BasicBlock(ResidualBlock):
    """Two 3x3 convs. ``out = act(merge(bn2(conv2(relu(bn1(conv1(x))))), shortcut))``.

    Args:
        in_channels, out_channels, stride: as in torchvision's BasicBlock.
        downsample: the shortcut module; built as a projection when ``None`` and the
            shape changes.
        technique: a name from :func:`reslab.list_techniques` or a Technique object.
        conv_bias: give the branch convs a bias (the source article keeps PyTorch's
            default ``bias=True``; torchvision uses ``False``).
        drop_path_rate: stochastic depth probability for this block's branch.
        zero_init_last: start the last BN gamma at zero (default: the technique's).
        num_blocks: residual blocks in the whole network, for depth-aware init (Fixup).
        technique_args: keyword arguments for the technique's constructor.
        init: apply the technique's init rule (:meth:`init_weights`) now. A :class:`~reslab.nn.models.ResNet`
            passes False: it applies the rule once, after its He init of every conv.
    """

    expansion = 1
    _branch_depth = 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        technique: str | Technique = "baseline",
        conv_bias: bool = False,
        drop_path_rate: float = 0.0,
        zero_init_last: bool | None = None,
        num_blocks: int = 1,
        technique_args: dict[str, Any] | None = None,
        init: bool = True,
    ) -> None:
        super().__init__()
        tech = _resolve(technique, technique_args)
        self.technique = tech
        self.conv1 = tech.conv(in_channels, out_channels, 3, stride, conv_bias)
        self.bn1 = tech.norm(in_channels if tech.preact else out_channels)
        self.conv2 = tech.conv(out_channels, out_channels, 3, 1, conv_bias)
        self.bn2 = tech.norm(out_channels) if tech.preact else tech.last_norm(out_channels)
        self._setup(in_channels, out_channels, stride, downsample, tech, drop_path_rate, zero_init_last)
        if init:
            self.init_weights(num_blocks)

    def _branch(self, x: Tensor, gain: Tensor | None = None) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self._last_norm(self.bn2, self.conv2(out), gain)

    def _preact_branch(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn2(self.conv1(x)))
        return self.conv2(out)


class Bottleneck(ResidualBlock):
    """1x1 -> 3x3 (carries the stride, as torchvision's v1.5) -> 1x1 expanding by 4.

    ``planes`` is the width of the inner convs; the block outputs
    ``planes * Bottleneck.expansion`` channels. Other arguments as :class:`BasicBlock`.
    """

    expansion = 4
    _branch_depth = 3

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        technique: str | Technique = "baseline",
        conv_bias: bool = False,
        drop_path_rate: float = 0.0,
        zero_init_last: bool | None = None,
        num_blocks: int = 1,
        technique_args: dict[str, Any] | None = None,
        init: bool = True,
    ) -> None:
        super().__init__()
        tech = _resolve(technique, technique_args)
        self.technique = tech
        out_channels = planes * self.expansion
        self.conv1 = tech.conv(in_channels, planes, 1, 1, conv_bias)
        self.bn1 = tech.norm(in_channels if tech.preact else planes)
        self.conv2 = tech.conv(planes, planes, 3, stride, conv_bias)
        self.bn2 = tech.norm(planes)
        self.conv3 = tech.conv(planes, out_channels, 1, 1, conv_bias)
        self.bn3 = tech.norm(planes) if tech.preact else tech.last_norm(out_channels)
        self._setup(in_channels, out_channels, stride, downsample, tech, drop_path_rate, zero_init_last)
        if init:
            self.init_weights(num_blocks)

    def _branch(self, x: Tensor, gain: Tensor | None = None) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self._last_norm(self.bn3, self.conv3(out), gain)

    def _preact_branch(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn2(self.conv1(x)))
        out = self.relu(self.bn3(self.conv2(out)))
        return self.conv3(out)


def block_normalizes_input(technique: str | Technique) -> bool:
    """Whether blocks with ``technique`` normalize their own input (pre-activation).

    A network of such blocks needs no norm in its stem and a final norm-ReLU before the
    pooling, since the last block's output is not normalized.
    """
    return get_technique(technique).preact


def residual_blocks(model: nn.Module) -> list[tuple[str, ResidualBlock]]:
    """Every residual block of ``model`` with its qualified name, in forward order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ResidualBlock)]


__all__ = [
    "BasicBlock",
    "Bottleneck",
    "DropPath",
    "ResidualBlock",
    "block_normalizes_input",
    "drop_path",
    "projection",
    "residual_blocks",
]
