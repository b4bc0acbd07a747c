"""Merge kernels the built-in techniques use, in the form measured faster on each device.

``add_scaled`` is ``x + gain * y`` and ``fused_concat_conv1x1`` a 1x1 conv on ``cat[a, b]``
plus ``a``. Each has two forms that compute the same thing:

* the CPU form writes as little activation-sized memory as it can: ``add_scaled``'s
  backward reduces the gain's gradient without materialising ``g * y``, and the fused conv
  runs as two half-width convs with no concatenation. On a 2-core CPU both were the faster
  (benchmarks/README.md, "Technique overhead").
* the GPU form is plain autograd with the fewest kernels (``addcmul``; concatenation, one
  full-width conv, an in-place add). On an H200 the CPU forms were the
  slower ones: resnet20 at batch 256 stepped 1.23x baseline's time with ``scale`` against
  1.08x for the article's eager ``F + scale * s``, and 1.56x against 1.34x with ``fusion``,
  where a step is launch-bound and a custom autograd function or a second conv costs more
  than the memory it saves.

Both forms are tested against the plain formulas on the CPU (``tests/nn/test_merges.py``)
and against each other on a GPU (``tests/test_cuda.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


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
    """``x + gain * y``, ``gain`` broadcast (a scalar or ``C x 1 x 1``): :func:`add_scaled_lean`
    on the CPU, plain ``addcmul`` elsewhere (see the module's notes)."""
    if x.device.type == "cpu":
        return add_scaled_lean(x, gain, y)
    return torch.addcmul(x, gain, y)


def add_scaled_lean(x: Tensor, gain: Tensor, y: Tensor) -> Tensor:
    """``x + gain * y`` with a backward that writes nothing activation-sized.

    Autograd's ``addcmul`` backward materialises ``g * y`` to reduce it to the gain's
    shape: on a 2-core CPU that product cost about as much as the rest of the merge. Here
    the gain's gradient is a reduction that writes nothing activation-sized.
    """
    if torch.is_grad_enabled() and (gain.requires_grad or x.requires_grad or y.requires_grad):
        return _AddScaled.apply(x, gain, y)
    return torch.addcmul(x, gain, y)


def fused_concat_conv1x1(
    a: Tensor, b: Tensor, weight: Tensor, bias: Tensor | None, add_identity: bool = False
) -> Tensor:
    """``(a if add_identity else 0) + conv1x1(cat[a, b], weight, bias)``:
    :func:`concat_conv1x1_split` on the CPU, :func:`concat_conv1x1_cat` elsewhere.

    ``weight`` may hold ``G`` such layers as one grouped conv (``G*C x 2C x 1 x 1``, ``a`` and
    ``b`` with ``G*C`` channels, group ``g`` reading its own ``C`` channels of each): the
    groups are read from the shapes.
    """
    if a.device.type == "cpu":
        return concat_conv1x1_split(a, b, weight, bias, add_identity)
    return concat_conv1x1_cat(a, b, weight, bias, add_identity)


def _identity_in(w: Tensor, groups: int) -> Tensor:
    """``w`` (``G*C x C x 1 x 1``, each group's block) plus the identity in every group."""
    c = w.shape[1]
    eye = torch.eye(c, dtype=w.dtype, device=w.device).repeat(groups, 1)
    return w + eye[:, :, None, None]


def concat_conv1x1_split(
    a: Tensor, b: Tensor, weight: Tensor, bias: Tensor | None, add_identity: bool = False
) -> Tensor:
    """The fused conv without the concatenation: ``W_a a + W_b b``, two half-width convs, the
    second accumulated in place into the first's output (conv backward needs its inputs,
    not its output, so this is safe for autograd); adding ``a`` itself is folded into the
    weight as ``W_a + I``. On a 2-core CPU, with channels_last, this ran about 2x faster than
    cat + conv (forward and backward) and faster than the same two products written as GEMMs
    on the NHWC view."""
    c = weight.shape[1] // 2  # input channels of one group, of each half
    groups = a.shape[1] // c  # 1, or K when a pack holds K such layers as one grouped conv
    w_a, w_b = weight[:, :c], weight[:, c:]
    if add_identity:
        w_a = _identity_in(w_a, groups)
    return F.conv2d(a, w_a, bias, groups=groups).add_(F.conv2d(b, w_b, groups=groups))


def concat_conv1x1_cat(a: Tensor, b: Tensor, weight: Tensor, bias: Tensor | None, add_identity: bool = False) -> Tensor:
    """The fused conv as one full-width conv on the concatenation (per group: each group's
    ``C`` channels of ``a`` then of ``b``), then ``a`` added in place: three kernels, where
    folding the identity into the weight would launch more, if smaller, ones."""
    c = weight.shape[1] // 2
    groups = a.shape[1] // c
    if groups == 1:
        ab = torch.cat([a, b], dim=1)
    elif a.is_contiguous(memory_format=torch.channels_last):  # group g reads [a_g, b_g], kept NHWC
        nhwc = [t.permute(0, 2, 3, 1).unflatten(3, (groups, c)) for t in (a, b)]
        ab = torch.cat(nhwc, dim=4).flatten(3, 4).permute(0, 3, 1, 2)
    else:
        ab = torch.cat([a.unflatten(1, (groups, c)), b.unflatten(1, (groups, c))], dim=2).flatten(1, 2)
    out = F.conv2d(ab, weight, bias, groups=groups)
    return out.add_(a) if add_identity else out


def scaled_batch_norm(bn: torch.nn.BatchNorm2d, x: Tensor, gain: Tensor) -> Tensor:
    """``gain * bn(x)`` as one batch norm whose weight and bias are scaled by ``gain`` (a
    scalar or one value per channel, flat): the same running statistics, momentum and
    counter as ``bn`` itself updates, and the gain's gradient comes through the affine's
    few numbers instead of an activation-sized product.

    ``bn``'s parameters are read, never swapped, so one model may run in several threads
    and be traced by ``torch.jit.trace``. ``bn``'s forward pre-hooks (a pack's cast to
    float32, :mod:`reslab.engine.packed.stack`) run first; its forward hooks do not."""
    for hook in bn._forward_pre_hooks.values():
        changed = hook(bn, (x,))
        if changed is not None:
            x = changed[0] if isinstance(changed, tuple) else changed
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # a cumulative average
            momentum = 1.0 / float(bn.num_batches_tracked)
    # batch statistics in training, or where there are no running ones to use
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    # the running statistics are read in evaluation, updated in training when tracked
    keep = not bn.training or bn.track_running_stats
    return F.batch_norm(
        x,
        bn.running_mean if keep else None,
        bn.running_var if keep else None,
        bn.weight * gain,
        bn.bias * gain,
        batch_stats,
        momentum,
        bn.eps,
    )
