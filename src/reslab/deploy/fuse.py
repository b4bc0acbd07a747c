"""Inference-time folding: a trained reslab model as plain convolutions.

In eval mode every BatchNorm is a per-channel affine map and every technique's merge is
linear in the branch output and the shortcut, so both fold into ordinary convolutions,
the way RepVGG folds its branches. :func:`fuse` returns a new, eval-only model whose eval
outputs equal the original's (up to float rounding; the algebra is done in float64):

The fuser knows no technique. It reads each block's structure from the block
(:meth:`~reslab.nn.blocks.ResidualBlock.branch_layers`, ``input_norm``, ``relu_after_merge``)
and each piece's eval-mode algebra from the piece itself (:mod:`reslab.nn.folding`):

* every BatchNorm goes into the conv before it (weights and bias), and so does any norm
  layer that states itself as ``fold_affine(channels) -> (scale, shift)`` (Fixup's scalar
  biases and multiplier);
* the merge, as its technique states it (``Technique.fold_merge``: ``G F + K s + h`` with
  ``G``, ``K`` per channel or channel-mixing matrices), goes into the branch's last conv
  (``G``, ``h``) and the shortcut (``K``): into the projection conv; on an identity
  shortcut, a diagonal ``K`` that is positive is pulled through the ReLU
  (``relu(F + k x) = k relu(F / k + x)``) and carried as a per-channel gain into the next
  block's first conv and shortcut, and finally into the classifier, so no multiply is
  left; any other diagonal ``K`` stays a multiply fused into the residual add (one
  ``addcmul``, the cost of the plain add); a mixing ``K`` becomes a 1x1 conv accumulated
  into the branch output. So ``F + scale * s`` with a positive scale leaves a plain
  ResNet, ``F + BN(F - s) = (1 + a) F - a s + b`` leaves a per-channel multiply on
  identity shortcuts, and ``F + W[F; s] + b`` leaves ``I + W_F`` in the last conv (a 1x1
  after a 3x3 is a 3x3) and ``W_s`` on the shortcut;
* a conv that adds a scalar to its input first (``fold_input_shift()``, Fixup's
  ``conv(x + c)``) is not a constant output shift at the borders of a zero-padded conv,
  so it is never folded into a bias there: the ReLU before such a conv becomes
  ``max(z + c, c)`` (an ``nn.Threshold``, the cost of a ReLU), which yields ``x + c``
  itself, and the conv keeps its zero padding, exactly as in the original. A 1x1 conv (no
  padding) takes it as a bias. Only a fused standalone block, whose input comes from
  outside, keeps an explicit constant pad (``pad(x, -c)`` then an unpadded conv);
* a block that normalizes its input (pre-activation, ``norm -> ReLU -> conv``): the norms
  after a branch conv fold into it. The input norm folds into the previous block's last
  conv and shortcut when the block doesn't need its raw input (a projection shortcut), and
  the network's final norm folds into the last block; otherwise (an identity shortcut
  needs the raw input as well as ``relu(norm(x))``) it stays an exact per-channel affine
  (:class:`ChannelAffine`) before the ReLU.

DropPath is the identity in eval mode and disappears. The fused model has no BatchNorm
and no technique parameters; for ``baseline``, ``scale`` (positive), ``skipinit``,
``layerscale`` and ``zero_init`` its blocks are those of a plain fused ResNet:
``relu(conv -> relu -> conv [-> relu -> conv] + (x | conv1x1(x)))``.

A fused model is rebuilt from a JSON *layout* (the layer list) plus its tensors, so it can
be saved as safetensors and loaded without executing or unpickling anything
(:func:`save_fused`, :func:`load_fused`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from reslab.deploy.fold import (
    BlockPlan,
    Emitter,
    _describes,
    _fold_norm,
    _input_bias,
    _norm_affine,
    first_conv,
    folded_conv,
    fuse_plain_block,
    fuse_preact_block,
    load_emitted,
    normalizes_input,
)
from reslab.deploy.fused import (
    LAYOUT_FORMAT,
    LAYOUT_VERSION,
    FusedBlock,
    FusedResNet,
)
from reslab.errors import UsageError
from reslab.nn.blocks import BasicBlock, Bottleneck, DropPath, ResidualBlock
from reslab.nn.folding import FOLD_DTYPE, bn_affine
from reslab.nn.models import ResNet
from reslab.nn.techniques import check_foldable, list_techniques, technique_class

# Layers the fuser folds by their type. Exact types: a subclass may compute something else
# in its forward. Any other layer must describe itself (see reslab.nn.folding).
_PLAIN_MODULES: tuple[type[nn.Module], ...] = (
    ResNet,
    BasicBlock,
    Bottleneck,
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.Identity,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Linear,
    nn.Sequential,
    DropPath,
)


def _technique_owned(model: nn.Module) -> list[str]:
    """Qualified names of the modules a technique added to its blocks (its fold_merge reads them)."""
    owned = []
    for name, m in model.named_modules():
        if isinstance(m, ResidualBlock):
            for attr in m.technique.parameter_names:
                if isinstance(getattr(m, attr, None), nn.Module):
                    owned.append(f"{name}.{attr}" if name else attr)
    return owned


def _validate(model: nn.Module) -> None:
    owned = _technique_owned(model)
    for name, m in model.named_modules():
        if m.training:
            raise UsageError(
                "fuse needs a model in eval mode (its BN running statistics get folded); call model.eval() first"
            )
        if any(name == o or name.startswith(o + ".") for o in owned) or type(m) in _PLAIN_MODULES:
            continue
        if _describes(m, "fold_affine") or (isinstance(m, nn.Conv2d) and _describes(m, "fold_input_shift")):
            continue
        where = name or "the model"
        raise UsageError(
            f"cannot fuse {where}: module type {type(m).__name__} is unknown to reslab.deploy.fuse, which folds "
            "reslab's ResNet, BasicBlock and Bottleneck layers and norm layers with a fold_affine(channels) "
            "method; fuse a model built by reslab.build_model"
        )
    for _, m in model.named_modules():
        if isinstance(m, ResidualBlock):
            check_foldable(m.technique)
    if isinstance(model, ResNet):
        if not isinstance(model.avgpool, nn.AdaptiveAvgPool2d) or model.avgpool.output_size not in ((1, 1), 1):
            raise UsageError("cannot fuse a ResNet whose pooling is not a global average pool")


def _dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(model.parameters())
    return p.dtype, p.device


def fuse(model: nn.Module) -> nn.Module:
    """An eval-only copy of ``model`` with every BatchNorm and technique merge folded away.

    ``model`` is a reslab :class:`~reslab.nn.models.ResNet` (returns a :class:`FusedResNet`)
    or a single :class:`~reslab.nn.blocks.BasicBlock`/:class:`~reslab.nn.blocks.Bottleneck`
    (returns a :class:`FusedBlock`), in eval mode. It is only read, never modified.
    Raises :class:`~reslab.errors.UsageError` for a model in training mode or with a
    module or technique reslab cannot fold.
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"fuse needs a torch.nn.Module, not {type(model).__name__}")
    _validate(model)
    dtype, device = _dtype_device(model)
    with torch.no_grad():
        if isinstance(model, ResidualBlock):
            block = _fuse_standalone(model, dtype, device)
            return block.eval()
        if type(model) is not ResNet:
            raise UsageError(
                f"cannot fuse a {type(model).__name__}: fuse takes a reslab ResNet (reslab.build_model) or one "
                "BasicBlock/Bottleneck"
            )
        fused = _fuse_resnet(model, dtype, device)
    fused.spec = getattr(model, "spec", None)
    return fused.eval()


def _fuse_standalone(block: ResidualBlock, dtype: torch.dtype, device: torch.device) -> FusedBlock:
    if normalizes_input(block):
        plan = fuse_preact_block(block, input_normalized=False, consumer=None)
    else:
        ones = torch.ones(first_conv(block).in_channels, dtype=FOLD_DTYPE, device=device)
        plan, _, _ = fuse_plain_block(block, ones, torch.zeros_like(ones), out_shift=0.0, carry=False)
    return plan.build(dtype, device)


def _fuse_resnet(model: ResNet, dtype: torch.dtype, device: torch.device) -> FusedResNet:
    stages = model.stages()
    blocks: list[ResidualBlock] = [b for s in stages for b in s]
    for b in blocks:
        if not isinstance(b, ResidualBlock):
            raise UsageError(f"cannot fuse a stage member of type {type(b).__name__}")
    prenorm = [normalizes_input(b) for b in blocks]
    preact = any(prenorm)
    if preact and not all(prenorm):
        raise UsageError("cannot fuse a ResNet mixing pre-activation and post-activation blocks")
    stem = Emitter()
    cw = folded_conv(model.conv1)
    _fold_norm(cw, model.bn1)
    # The stem's output is stored shifted by the first block's Fixup input bias, if any.
    first_shift = 0.0 if preact or not blocks else _input_bias(first_conv(blocks[0]))
    cw.bias = cw.bias + first_shift
    stem.conv(cw)
    if type(model.relu) is not nn.ReLU:
        raise UsageError("cannot fuse a ResNet whose stem activation is not a ReLU")
    stem.act(first_shift)
    if isinstance(model.maxpool, nn.MaxPool2d):
        mp = model.maxpool
        if (
            mp.dilation != 1
            or mp.ceil_mode
            or not all(isinstance(v, int) for v in (mp.kernel_size, mp.stride, mp.padding))
        ):
            raise UsageError("cannot fuse a ResNet stem max pool other than torchvision's (3, stride 2, padding 1)")
        stem.add({"type": "maxpool", "kernel": mp.kernel_size, "stride": mp.stride, "padding": mp.padding})

    plans: list[BlockPlan] = []
    channels = model.conv1.out_channels
    c = torch.ones(channels, dtype=FOLD_DTYPE, device=device)
    d = -first_shift * c
    head_act: dict[str, Any] | None = None
    if preact:
        final = model.final_norm
        if type(final) is not nn.Sequential or len(final) != 2 or type(final[0]) is not nn.BatchNorm2d:
            raise UsageError("cannot fuse a pre-activation ResNet without its final BN-ReLU")
        for k, b in enumerate(blocks):
            nxt = blocks[k + 1] if k + 1 < len(blocks) else None
            if nxt is None:
                consumer = bn_affine(final[0])
            elif nxt.downsample is not None:
                nxt_norm = nxt.input_norm()
                assert nxt_norm is not None
                consumer = _norm_affine(nxt_norm, first_conv(nxt).in_channels)
            else:
                consumer = None
            normalized = k > 0 and b.downsample is not None
            plans.append(fuse_preact_block(b, normalized, consumer))
        head_act = {"type": "relu"}
        # The final BN went into the last block; its output is stored as it is.
        c = torch.ones(model.fc.in_features, dtype=FOLD_DTYPE, device=device)
        d = torch.zeros_like(c)
    else:
        for k, b in enumerate(blocks):
            nxt = blocks[k + 1] if k + 1 < len(blocks) else None
            shift = _input_bias(first_conv(nxt)) if nxt is not None else 0.0
            plan, c, d = fuse_plain_block(b, c, d, shift, carry=True)
            plans.append(plan)

    fc = model.fc
    w = fc.weight.detach().to(FOLD_DTYPE)
    fc_b = (
        fc.bias.detach().to(FOLD_DTYPE)
        if fc.bias is not None
        else torch.zeros(w.shape[0], dtype=FOLD_DTYPE, device=device)
    )
    # The pooled features are c * mean(y) + d: fold that into the classifier.
    fc_b = fc_b + w @ d
    w = w * c[None, :]

    sizes = [len(s) for s in stages]
    stage_cfgs: list[list[dict[str, Any]]] = []
    i = 0
    for n in sizes:
        stage_cfgs.append([p.cfg for p in plans[i : i + n]])
        i += n
    layout = {
        "format": LAYOUT_FORMAT,
        "version": LAYOUT_VERSION,
        "stem": stem.cfgs,
        "stages": stage_cfgs,
        "head": {"act": head_act, "features": w.shape[1], "num_classes": w.shape[0]},
    }
    fused = FusedResNet(layout).to(dtype=dtype, device=device)
    load_emitted(list(fused.stem), stem.tensors)
    built = [b for stage in fused.stages() for b in stage]
    for plan, block in zip(plans, built, strict=True):
        plan.load_into(block)
    fused.fc.weight.data.copy_(w)
    fused.fc.bias.data.copy_(fc_b)
    return fused


def technique_leftovers(model: nn.Module) -> list[str]:
    """Names of what no fused model should hold: BatchNorms, layers that describe themselves for
    folding (a technique's norm or biased conv) and parameters named like any registered
    technique's (for checks)."""
    names = {n for t in list_techniques() for n in technique_class(t).parameter_names}
    left = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        or callable(getattr(m, "fold_affine", None))
        or callable(getattr(m, "fold_input_shift", None))
    ]
    left += [n for n, _ in model.named_parameters() if names & set(n.split("."))]
    return left


__all__ = ["fuse", "technique_leftovers"]
