"""The technique contract: how a residual block merges its branch ``F(x)`` with its shortcut ``s``.

A residual block (:mod:`reslab.nn.blocks`) computes a branch and a shortcut and hands both
to its technique's :meth:`Technique.merge`. A technique is a small stateless object that
owns everything about itself: it adds its parameters to the block (under the attribute
names the source article uses, so the article's state dicts load as they are), decides
the merge, the branch's normalization and conv layers where it must, its initialisation,
how a plain (pretrained) block's function is kept (:meth:`Technique.from_plain`), and its
merge's eval-mode algebra (:meth:`Technique.fold_merge`) so that ``reslab fuse`` can fold
it into plain convolutions. Adding one is one class and one :func:`~reslab.nn.registry.register`
call, in any module; it then works in both block kinds, every model and command.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from reslab.errors import UsageError
from reslab.nn.folding import MergeFold, fold_is_current


class FunctionChanged(Exception):
    """Raised by :meth:`Technique.from_plain` when no setting of the technique's parameters
    makes a block compute the plain block's function; the message says why."""


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

    def add_parameters(self, block: nn.Module, channels: int) -> None:
        """Register the technique's parameters on ``block`` (``channels`` = block output)."""

    def merge(self, block: nn.Module, branch: Tensor, shortcut: Tensor) -> Tensor:
        """Combine branch output and shortcut, before the block's final activation."""
        return branch + shortcut

    def branch_gain(self, block: nn.Module) -> Tensor | None:
        """The gain ``g`` when :meth:`merge` is ``s + g * F(x)`` with ``g`` a scalar or
        ``C x 1 x 1`` parameter of ``block``, else None (the default).

        A block whose branch ends with a BatchNorm then computes ``g * F(x)`` inside that
        BatchNorm (its affine scaled by ``g``, a few hundred numbers) and merges with a plain
        add, instead of calling :meth:`merge`: the same function, without an activation-sized
        multiply in the forward pass and two more passes in the backward. Elsewhere (a
        pre-activation branch ends with a conv) the block calls :meth:`merge`, which must
        compute the same thing. A subclass that overrides :meth:`merge` but inherits this
        method keeps its merge: the block folds only a gain written with (or after) the merge.
        """
        return None

    def fold_merge(self, block: nn.Module, channels: int) -> MergeFold:
        """The eval-mode :meth:`merge` of ``block`` as ``gain * F + coef * s + shift``, in float64.

        ``reslab fuse`` folds this into the block's convolutions, so it must equal
        :meth:`merge` exactly in eval mode (``channels`` = block output channels). The
        default describes the plain merge ``F + s``; a technique that overrides
        :meth:`merge` must override this too, or ``fuse`` refuses it (see
        :func:`merge_fold`).
        """
        return MergeFold()

    def from_plain(self, block: nn.Module) -> dict[str, str]:
        """Set this technique's parameters on ``block`` so that it computes what the plain
        (``baseline``) block with the same branch and shortcut weights computes.

        Called by pretrained loading (:func:`reslab.nn.pretrained.load_pretrained`) once the
        plain backbone's weights are in the block, under ``torch.no_grad()``. Returns, per
        attribute set, how it was set (e.g. ``{"scale": "1: F(x) + s"}``), for the loading
        report. Raises :class:`FunctionChanged` with the reason when no setting keeps the
        plain function (the weights still load; fine-tuning starts from a changed network),
        and :class:`~reslab.errors.UsageError` when a plain ResNet's weights cannot go into
        this technique's blocks at all (this must not depend on the block's values).

        The default: a technique that keeps the plain block (the plain merge, BatchNorm,
        post-activation order) and adds no parameters has nothing to set; any other
        technique must say how, so the default raises :class:`FunctionChanged`.
        """
        plain = type(self).merge is Technique.merge and self.normalized and not self.preact and not self.parameter_names
        if plain:
            return {}
        raise FunctionChanged(
            f"technique {self.name!r} does not say how to keep a plain block's function "
            "(it defines no from_plain method)"
        )

    def init_block(self, block: nn.Module, num_blocks: int) -> None:
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
    """Raise a :class:`~reslab.errors.UsageError` if ``fold_merge`` does not describe ``merge``
    (nor ``branch_gain``, which a block may use in its place).

    A subclass that overrides ``merge`` but inherits ``fold_merge`` would be folded as its
    parent's merge: that is an error naming the method to write, not a silently wrong model.
    """
    cls = type(technique)
    for computes in ("merge", "branch_gain"):  # a block's merge is either
        if not fold_is_current(technique, computes, "fold_merge"):
            raise UsageError(
                f"cannot fuse technique {technique.name!r} ({cls.__name__}): it overrides {computes}() but not "
                f"fold_merge(); define {cls.__name__}.fold_merge(block, channels) returning a "
                "reslab.nn.folding.MergeFold(gain, coef, shift) equal to its eval-mode merge"
            )


def merge_fold(technique: Technique, block: nn.Module, channels: int) -> MergeFold:
    """``technique.fold_merge(block, channels)``, after :func:`check_foldable`."""
    check_foldable(technique)
    return technique.fold_merge(block, channels)
