"""The vocabulary layers and techniques use to describe themselves for inference folding.

:func:`reslab.deploy.fuse.fuse` turns a trained model into plain convolutions. It does not know
any technique: it asks each piece for its eval-mode algebra, in float64.

* A technique states its merge as ``gain * F + coef * s + shift`` per output channel
  (:class:`MergeFold`, from :meth:`reslab.nn.techniques.Technique.fold_merge`).
* A layer a technique puts after a conv instead of BatchNorm (Fixup's scalar biases)
  states itself as a per-channel affine ``scale * x + shift`` with a ``fold_affine(channels)``
  method.
* A conv that shifts its input by a scalar first (Fixup's ``conv(x + c)``) states the
  shift with a ``fold_input_shift()`` method.

A description is trusted only if it was written for the code that runs: a class that
overrides the computation (``merge``, ``forward``) below the class that wrote the
description would be folded as something it no longer computes, so :func:`fold_is_current`
refuses it and the fuser says which method to implement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from reslab.errors import UsageError

#: the dtype all folding arithmetic is done in (the fused model is stored in the model's).
FOLD_DTYPE = torch.float64


@dataclass
class MergeFold:
    """A merge in eval mode: ``out = gain ⊙ F + coef ⊙ s + shift`` for ``C`` channels.

    ``gain`` and ``coef`` are each a number or 1-element tensor (the same for every
    channel), a ``(C,)`` tensor (per channel) or a ``(C, C)`` matrix (channel mixing, as a
    1x1 conv does: ``out[o] = sum_c gain[o, c] * F[c]``). ``shift`` is a number or a ``(C,)``
    tensor. The plain residual merge ``F + s`` is ``MergeFold(1.0, 1.0, 0.0)``.
    """

    gain: Tensor | float = 1.0
    coef: Tensor | float = 1.0
    shift: Tensor | float = 0.0


def bn_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """An eval-mode BatchNorm as ``a * x + b`` per channel, in float64.

    Raises :class:`~reslab.errors.UsageError` for a BatchNorm without running statistics: it normalizes with
    batch statistics even in eval mode, so it is not an affine map.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise UsageError(
            f"cannot fuse {bn}: it has no running statistics (track_running_stats=False normalizes with "
            "batch statistics even in eval mode); build it with running statistics"
        )
    a = torch.rsqrt(bn.running_var.detach().to(FOLD_DTYPE) + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.detach().to(FOLD_DTYPE)
    b = -bn.running_mean.detach().to(FOLD_DTYPE) * a
    if bn.bias is not None:
        b = b + bn.bias.detach().to(FOLD_DTYPE)
    return a, b


def scalar(p: Tensor) -> Tensor:
    """A 1-element parameter as a float64 0-d tensor."""
    return p.detach().to(FOLD_DTYPE).reshape(-1)[0]


def _defining_class(cls: type, attr: str) -> type | None:
    for c in cls.__mro__:
        if attr in vars(c):
            return c
    return None


def fold_is_current(obj: object, computes: str, describes: str) -> bool:
    """Whether ``obj``'s ``describes`` method was written with (or after) its ``computes``.

    False when a subclass overrides ``computes`` (say ``merge``) but inherits
    ``describes`` (say ``fold_merge``) from a class above it: the inherited description
    would be of the parent's computation.
    """
    comp = _defining_class(type(obj), computes)
    desc = _defining_class(type(obj), describes)
    if desc is None:
        return False
    return comp is None or issubclass(desc, comp)


__all__ = ["FOLD_DTYPE", "MergeFold", "bn_affine", "fold_is_current", "scalar"]
