"""K models of one architecture as one model of grouped layers: the second route of a pack.

``vmap`` (:mod:`.stack`) maps any architecture over the pack, but it moves each activation
between the members' layout and a grouped convolution's at every layer, and keeps the
images in NCHW. Here the pack *is* one network: the activations of member ``k`` are the
channels ``k*C .. (k+1)*C - 1`` of one ``B x K*C x H x W`` tensor, every convolution has
``K`` times its groups, every BatchNorm ``K`` times its channels (each channel sees only its
member's images, so its statistics are the member's own), the classifier is a batched
matrix product, and DropPath draws per sample *and* member. Nothing moves between layers,
and on a GPU the tensors can stay in channels_last.

The grouped model's parameters are views of the pack's stacked tensors (``K x`` the
member's shape, see :class:`~reslab.engine.packed.stack.PackedModel`): a member's conv
weight ``O x I x h x w`` stacked is ``K x O x I x h x w``, whose reshape to ``K*O x I x h x w``
is the grouped weight. So the optimizer, freezing, and the members' checkpoints are the same
for both routes; only the forward pass differs.

Which models take this route: those built from modules with a known grouped form
(:data:`CHANNEL_FREE`, ``Conv2d``, ``BatchNorm2d``, ``Linear``, ``DropPath``, reslab's
ResNet and blocks) whose technique adds parameters of shape ``1`` (a scalar, broadcast
over the block's channels) or ``C x 1 x 1`` (per channel), or modules of a known kind. A
technique's own module says what it is in a pack with a method ``grouped(k)`` returning a
module that takes the stacked parameters as they are (``k x`` the member's shape, same
names) and a pack's ``B x k*C x ...`` activations: Fixup's scalar biases, multipliers and
biased convs do (:mod:`reslab.nn.techniques`), and a plugin's may. The conversion
(:func:`grouped_model`) says why it refuses anything else, and the pack then takes the
``vmap`` route; :func:`reslab.engine.packed.check.pack_route` also checks a conversion
numerically against the members alone before the grouped route is used.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from reslab.nn.blocks import DropPath, ResidualBlock, drop_path
from reslab.nn.models import ResNet

#: module types with no parameters whose forward treats every channel alike: they act on
#: a pack's ``K*C`` channels as on a member's ``C``
CHANNEL_FREE: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.Sequential,
    nn.AdaptiveAvgPool2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.Flatten,
    nn.Dropout,
)

#: turns a stacked tensor (``K x`` the member's shape) into the grouped model's tensor
View = Callable[[Tensor], Tensor]


class GroupedLinear(nn.Module):
    """``K`` linear layers on the ``K`` member slices of a ``B x K*I`` input: ``B x K*O``.

    Its ``weight`` and ``bias`` are the stacked ``K x O x I`` and ``K x O`` tensors."""

    def __init__(self, k: int, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.k, self.in_features, self.out_features = k, in_features, out_features
        self.weight = nn.Parameter(torch.empty(k, out_features, in_features, device="meta"))
        self.bias = nn.Parameter(torch.empty(k, out_features, device="meta")) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        xs = x.reshape(b, self.k, self.in_features).transpose(0, 1)  # K x B x I
        w = self.weight.transpose(1, 2)
        if self.bias is not None:  # one rounding, as a member's addmm
            out = torch.baddbmm(self.bias[:, None, :], xs, w)
        else:
            out = torch.bmm(xs, w)  # K x B x O
        return out.transpose(0, 1).reshape(b, self.k * self.out_features)


class GroupedDropPath(nn.Module):
    """DropPath on a pack: each sample of each member is kept or dropped on its own draw."""

    def __init__(self, p: float, k: int) -> None:
        super().__init__()
        self.p, self.k = p, k

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        return drop_path(x.unflatten(1, (self.k, -1)), self.p, dims=2).flatten(1, 2)


class NotGroupable(Exception):
    """The model has a part with no grouped form; the message names it."""


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def _flat(t: Tensor) -> Tensor:
    """``K x n x ...`` -> ``K*n x ...`` (a view of a stacked tensor)."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _same(t: Tensor) -> Tensor:
    return t


def _scalar_over(channels: int) -> View:
    """A stacked scalar ``K x 1`` -> ``K*C x 1 x 1``: each member's scalar over its channels."""
    return lambda t: t.expand(t.shape[0], channels).reshape(-1, 1, 1)


def _block_parameters(name: str, block: ResidualBlock, views: dict[str, View]) -> None:
    """The views of the parameters a technique put directly on ``block``."""
    channels = block.branch_convs()[-1].out_channels
    for pname, p in block.named_parameters(recurse=False):
        full = f"{name}.{pname}" if name else pname
        if tuple(p.shape) == (1,):
            views[full] = _scalar_over(channels)
        elif tuple(p.shape) == (channels, 1, 1):
            views[full] = _flat
        else:
            raise NotGroupable(
                f"parameter {full} of shape {tuple(p.shape)} (only scalars and per-channel C x 1 x 1 ones have a "
                "grouped form)"
            )
    if any(True for _ in block.named_buffers(recurse=False)):
        raise NotGroupable(f"block {name} has buffers of its own")


def grouped_model(member: nn.Module, k: int) -> tuple[nn.Module, dict[str, View]]:
    """A parameterless (meta) copy of ``member`` whose layers are grouped over ``k`` members,
    and for each of its parameter and buffer names the view that makes the pack's stacked
    tensor the grouped model's. Raises :class:`NotGroupable` naming the part with no grouped
    form."""
    if not isinstance(member, ResNet):
        raise NotGroupable(f"the model is a {type(member).__name__}, not a reslab ResNet")
    model = copy.deepcopy(member).to("meta")
    views: dict[str, View] = {}
    for name, m in list(model.named_modules()):
        kind = type(m)
        if callable(getattr(m, "grouped", None)):
            # a module of a technique's own that says what it is for a pack: its parameters and
            # buffers under their names, stacked (k x the member's shape) as they are
            try:
                _set_child(model, name, m.grouped(k))
            except ValueError as e:
                raise NotGroupable(f"module {name}: {e}") from None
            for n, _ in (*m.named_parameters(), *m.named_buffers()):
                views[f"{name}.{n}"] = _same
        elif kind is nn.Conv2d:
            if m.padding_mode != "zeros":
                raise NotGroupable(f"conv {name} pads with {m.padding_mode!r}")
            m.in_channels, m.out_channels, m.groups = m.in_channels * k, m.out_channels * k, m.groups * k
            views[f"{name}.weight"] = _flat
            if m.bias is not None:
                views[f"{name}.bias"] = _flat
        elif kind is nn.BatchNorm2d:
            if m.momentum is None:
                raise NotGroupable(f"BatchNorm {name} averages cumulatively (momentum None)")
            m.num_features *= k
            for p in ("weight", "bias", "running_mean", "running_var"):
                if getattr(m, p, None) is not None:
                    views[f"{name}.{p}"] = _flat
            if m.num_batches_tracked is not None:
                views[f"{name}.num_batches_tracked"] = _same  # K counters, each added to alike
        elif kind is nn.Linear:
            _set_child(model, name, GroupedLinear(k, m.in_features, m.out_features, m.bias is not None))
            views[f"{name}.weight"] = _same
            if m.bias is not None:
                views[f"{name}.bias"] = _same
        elif kind is DropPath:
            _set_child(model, name, GroupedDropPath(m.p, k))
        elif isinstance(m, ResidualBlock):
            if kind.forward is not ResidualBlock.forward:
                raise NotGroupable(f"block {name} ({kind.__name__}) has a forward of its own")
            _block_parameters(name, m, views)
        elif kind is ResNet:
            if any(True for _ in m.named_parameters(recurse=False)):
                raise NotGroupable("the model has parameters of its own")
        elif kind not in CHANNEL_FREE:
            raise NotGroupable(f"module {name} ({kind.__module__}.{kind.__qualname__}) has no grouped form")
    missing = {n for n, _ in member.named_parameters()} | {n for n, _ in member.named_buffers()}
    missing -= views.keys()
    if missing:
        raise NotGroupable(f"no grouped form for {sorted(missing)[0]}")
    return model, views


def channels_last_stack(t: Tensor) -> Tensor:
    """A copy of a stacked conv weight (``K x O x I x h x w``) laid out so that its grouped
    view (``K*O x I x h x w``) is channels_last: the layout the grouped convolutions run in."""
    _, o, i, h, w = t.shape
    out = torch.empty_strided(t.shape, (o * i * h * w, i * h * w, 1, w * i, i), dtype=t.dtype, device=t.device)
    return out.copy_(t)


__all__ = ["CHANNEL_FREE", "GroupedDropPath", "GroupedLinear", "NotGroupable", "channels_last_stack", "grouped_model"]
