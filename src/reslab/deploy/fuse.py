"""Inference-time folding: a trained reslab model as plain convolutions.

In eval mode every BatchNorm is a per-channel affine map and every technique's merge is
linear in the branch output and the shortcut, so both fold into ordinary convolutions,
the way RepVGG folds its branches. :func:`fuse` returns a new, eval-only model whose eval
outputs equal the original's (up to float rounding; the algebra is done in float64):

The fuser knows no technique. It reads each block's structure from the block
(:meth:`~reslab.nn.blocks.ResidualBlock.branch_layers`, ``input_norm``, ``relu_after_merge``)
and each piece's eval-mode algebra from the piece itself (:mod:`reslab.folding`):

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

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from reslab.errors import UsageError
from reslab.files import atomic_write, load_state
from reslab.nn.blocks import BasicBlock, Bottleneck, DropPath, ResidualBlock
from reslab.nn.folding import FOLD_DTYPE, bn_affine, fold_is_current
from reslab.nn.models import ModelSpec, ResNet
from reslab.nn.techniques import check_foldable, list_techniques, merge_fold, technique_class
from reslab.nn.weights import METADATA_KEY, read_metadata

LAYOUT_FORMAT = "reslab-fused"
LAYOUT_VERSION = 1
_DT = FOLD_DTYPE  # fold in double precision, store in the model's dtype
# A positive shortcut gain carried through ReLUs is kept inside this range, so that the
# activations it rescales stay far from float32 overflow and underflow.
_MAX_CARRIED_GAIN = 1e6


# ---------------------------------------------------------------------------------------
# The fused model's modules.


class ChannelAffine(nn.Module):
    """``weight * x + bias`` per channel (an eval-mode BatchNorm that cannot be folded)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(channels, 1, 1))
        self.register_buffer("bias", torch.zeros(channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.bias, x, self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}"


def _build_layer(cfg: dict[str, Any]) -> nn.Module:
    kind = cfg["type"]
    if kind == "conv":
        return nn.Conv2d(
            int(cfg["in"]),
            int(cfg["out"]),
            tuple(cfg["kernel"]),
            stride=tuple(cfg["stride"]),
            padding=tuple(cfg["padding"]),
            bias=bool(cfg["bias"]),
        )
    if kind == "pad":
        return nn.ConstantPad2d(tuple(int(p) for p in cfg["padding"]), float(cfg["value"]))
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "threshold":
        v = float(cfg["value"])
        return nn.Threshold(v, v, inplace=True)
    if kind == "maxpool":
        return nn.MaxPool2d(int(cfg["kernel"]), stride=int(cfg["stride"]), padding=int(cfg["padding"]))
    if kind == "affine":
        return ChannelAffine(int(cfg["channels"]))
    raise ValueError(f"unknown fused layer type {kind!r}")


class FusedBlock(nn.Module):
    """A folded residual block: ``act(branch(x) + shortcut_scale * shortcut(x))``.

    ``preact`` blocks compute ``pre = relu(pre_affine(x))``, run the branch (and a
    projection shortcut) on ``pre`` and have no activation after the add. Everything
    absent is skipped: a plain block is ``relu(branch(x) + x)`` or
    ``relu(branch(x) + conv1x1(x))``.

    ``shortcut_matmul`` (a stride-1 1x1 shortcut conv, the fused ``fusion`` merge on an
    identity shortcut) accumulates ``W @ x`` straight into the branch output as a batched
    matrix product instead of running a separate 1x1 conv and add: on the CPU a 1x1 conv
    of few channels is far slower than its arithmetic, and this saves a temporary too.
    """

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.preact = bool(cfg["preact"])
        self.pre_affine = ChannelAffine(int(cfg["pre_affine"])) if cfg.get("pre_affine") else None
        self.branch = nn.Sequential(*(_build_layer(c) for c in cfg["branch"]))
        self.shortcut = _build_layer(cfg["shortcut"]) if cfg.get("shortcut") else None
        scale = cfg.get("shortcut_scale")
        if scale is None:
            self.register_buffer("shortcut_scale", None)
        else:
            self.register_buffer("shortcut_scale", torch.ones(int(scale), 1, 1))
        self.act = _build_layer(cfg["act"]) if cfg.get("act") else None
        self.shortcut_matmul = bool(cfg.get("shortcut_matmul", False))
        if self.shortcut_matmul:
            sc = self.shortcut
            if not (
                isinstance(sc, nn.Conv2d)
                and sc.kernel_size == (1, 1)
                and sc.stride == (1, 1)
                and sc.padding == (0, 0)
                and sc.bias is None
                and sc.in_channels == sc.out_channels
            ):
                raise ValueError("shortcut_matmul needs a square stride-1 1x1 shortcut conv without bias")

    def forward(self, x: Tensor) -> Tensor:
        if self.preact:
            pre = x if self.pre_affine is None else self.pre_affine(x)
            # Out of place: an identity shortcut still needs x.
            pre = F.relu(pre)
            out = self.branch(pre)
            src = pre
        else:
            out = self.branch(x)
            src = x
        if self.shortcut_matmul and self.shortcut_scale is None:
            out = _accumulate_1x1(out, self.shortcut.weight, src)  # type: ignore[union-attr]
            return out if self.act is None else self.act(out)
        s = x if self.shortcut is None else self.shortcut(src)
        # The branch output is a fresh conv result, so the merge can write into it.
        if self.shortcut_scale is None:
            out = out.add_(s)
        else:
            out = out.addcmul_(s, self.shortcut_scale)
        if self.act is not None:
            out = self.act(out)
        return out


def _accumulate_1x1(out: Tensor, weight: Tensor, x: Tensor) -> Tensor:
    """``out += conv1x1(x, weight)`` in place, as one matrix product per layout."""
    n, c, h, w = x.shape
    wm = weight.reshape(weight.shape[0], c)
    cl = torch.channels_last
    if x.is_contiguous(memory_format=cl) and out.is_contiguous(memory_format=cl):
        # NHWC: the (N*H*W, C) views are GEMM operands as they are.
        out.permute(0, 2, 3, 1).reshape(-1, wm.shape[0]).addmm_(x.permute(0, 2, 3, 1).reshape(-1, c), wm.t())
        return out
    if x.is_contiguous() and out.is_contiguous():
        out.view(n, -1, h * w).baddbmm_(wm.expand(n, -1, -1), x.view(n, c, h * w))
        return out
    return out.add_(F.conv2d(x, weight))


class FusedResNet(nn.Module):
    """A fused reslab ResNet, built from its JSON ``layout`` (see :func:`fuse`)."""

    def __init__(self, layout: dict[str, Any]) -> None:
        super().__init__()
        _check_layout(layout)
        self.layout = layout
        self.stem = nn.Sequential(*(_build_layer(c) for c in layout["stem"]))
        self.num_stages = len(layout["stages"])
        for i, stage in enumerate(layout["stages"]):
            self.add_module(f"layer{i + 1}", nn.Sequential(*(FusedBlock(b) for b in stage)))
        head = layout["head"]
        self.head_act = _build_layer(head["act"]) if head.get("act") else None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(int(head["features"]), int(head["num_classes"]))
        #: the spec of the model this was fused from (set by fuse/load_fused).
        self.spec: ModelSpec | None = None

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in self.stages():
            x = stage(x)
        if self.head_act is not None:
            x = self.head_act(x)
        return self.fc(self.avgpool(x).flatten(1))


def _check_layout(layout: Any) -> None:
    if not isinstance(layout, dict) or layout.get("format") != LAYOUT_FORMAT:
        raise ValueError("not a reslab fused-model layout")
    if layout.get("version") != LAYOUT_VERSION:
        raise ValueError(
            f"fused-model layout version {layout.get('version')!r} is not supported (this reslab reads "
            f"version {LAYOUT_VERSION}); fuse the original model again with this reslab"
        )
    for key in ("stem", "stages", "head"):
        if key not in layout:
            raise ValueError(f"fused-model layout has no {key!r}")


# ---------------------------------------------------------------------------------------
# Folding algebra, in float64.


@dataclass
class _Conv:
    """A conv being folded: ``conv(pad(x), weight, stride) + bias``.

    ``pad_value`` set means the input is padded with that constant by an explicit pad
    layer and the conv itself has no padding.
    """

    weight: Tensor  # (O, I, kh, kw)
    bias: Tensor  # (O,)
    stride: tuple[int, int]
    padding: tuple[int, int]
    pad_value: float | None = None

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def scale_out(self, g: Tensor, h: Tensor | float = 0.0) -> None:
        """Output channel o becomes ``g[o] * out[o] + h[o]``."""
        self.weight = self.weight * g[:, None, None, None]
        self.bias = self.bias * g + h

    def mix_out(self, m: Tensor, h: Tensor | float = 0.0) -> None:
        """Outputs become ``m @ out + h`` (a 1x1 conv after this one)."""
        self.weight = torch.einsum("oc,cikl->oikl", m, self.weight)
        self.bias = m @ self.bias + h

    def take_input(self, c: Tensor, e: Tensor) -> None:
        """The conv's input ``x`` is given as ``c * y + e`` per channel: make it act on ``y``.

        With zero padding the constant ``e`` is not a constant output shift at the
        borders, so a padded conv takes ``e`` as an explicit pad value instead.
        """
        w0 = self.weight
        self.weight = w0 * c[None, :, None, None]
        if not bool(torch.any(e != 0)):
            return
        self.bias = self.bias + (w0 * e[None, :, None, None]).sum(dim=(1, 2, 3))
        if self.padding == (0, 0):
            return
        # pad0(c*y + e) == c * pad_v(y) + e with v = -e / c, one scalar for the pad layer.
        v = -e / c
        if self.pad_value is not None or not bool(torch.all(v == v[0])):
            raise RuntimeError("internal: a padded conv got a per-channel input shift it cannot take exactly")
        self.pad_value = float(v[0])


def _conv(m: nn.Conv2d) -> _Conv:
    if m.groups != 1 or tuple(m.dilation) != (1, 1) or m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise UsageError(
            f"cannot fuse conv {m}: only groups=1, dilation=1, zero padding given as numbers are supported"
        )
    w = m.weight.detach().to(_DT).clone()
    b = m.bias.detach().to(_DT).clone() if m.bias is not None else torch.zeros(w.shape[0], dtype=_DT, device=w.device)
    return _Conv(w, b, tuple(m.stride), tuple(m.padding))  # type: ignore[arg-type]


_bn_affine = bn_affine


def _fold_norm(cw: _Conv, norm: nn.Module) -> None:
    """Fold the normalization layer that follows a conv into it.

    BatchNorm is folded from its statistics; any other norm layer must describe itself
    with ``fold_affine(channels) -> (scale, shift)`` (see :mod:`reslab.folding`).
    """
    if not isinstance(norm, nn.Identity):
        cw.scale_out(*_norm_affine(norm, cw.out_channels))


def _norm_affine(norm: nn.Module, channels: int) -> tuple[Tensor, Tensor]:
    """An eval-mode norm layer as ``(scale, shift)`` per channel, in float64."""
    if isinstance(norm, nn.BatchNorm2d):
        return _bn_affine(norm)
    if _describes(norm, "fold_affine"):
        a, b = norm.fold_affine(channels)  # type: ignore[operator]
        return torch.as_tensor(a, dtype=_DT), torch.as_tensor(b, dtype=_DT)
    raise UsageError(
        f"cannot fuse normalization {type(norm).__name__}: give it a fold_affine(channels) method returning "
        "its eval-mode (scale, shift) per channel"
    )


def _describes(m: nn.Module, method: str) -> bool:
    """Whether ``m`` has ``method`` describing the ``forward`` it really runs."""
    return callable(getattr(m, method, None)) and fold_is_current(m, "forward", method)


def _input_bias(conv: nn.Module) -> float:
    """The scalar a conv adds to its input before convolving (0 for an ordinary conv)."""
    if _describes(conv, "fold_input_shift"):
        return float(conv.fold_input_shift())  # type: ignore[operator]
    return 0.0


@dataclass
class _Merge:
    """A technique's eval-mode merge ``G F + K s + h`` (G, K: (C, C) matrices)."""

    gain: Tensor
    shift: Tensor
    coef: Tensor
    coef_diagonal: bool


def _merge_algebra(block: ResidualBlock, channels: int, device: torch.device) -> _Merge:
    """The block technique's :class:`~reslab.nn.folding.MergeFold` as ``(C, C)`` matrices."""
    fold = merge_fold(block.technique, block, channels)
    where = f"technique {block.technique.name!r} ({type(block.technique).__name__}).fold_merge"

    def matrix(v: Tensor | float, what: str) -> tuple[Tensor, bool]:
        t = torch.as_tensor(v, dtype=_DT).to(device)
        if t.numel() == 1:
            return torch.eye(channels, dtype=_DT, device=device) * t.reshape(()), True
        if t.shape == (channels,):
            return torch.diag(t), True
        if t.shape == (channels, channels):
            return t, False
        raise UsageError(
            f"{where} gave {what} of shape {tuple(t.shape)}; expected a number, ({channels},) or "
            f"({channels}, {channels})"
        )

    gain, _ = matrix(fold.gain, "gain")
    coef, diagonal = matrix(fold.coef, "coef")
    shift = torch.as_tensor(fold.shift, dtype=_DT).to(device)
    if shift.numel() == 1:
        shift = shift.reshape(()).expand(channels)
    if shift.shape != (channels,):
        raise UsageError(f"{where} gave a shift of shape {tuple(shift.shape)}; expected a number or ({channels},)")
    return _Merge(gain, shift, coef, diagonal)


def _apply_gain(cw: _Conv, m: _Merge) -> None:
    if _is_diagonal(m.gain):
        cw.scale_out(torch.diagonal(m.gain), m.shift)
    else:
        cw.mix_out(m.gain, m.shift)


def _is_diagonal(m: Tensor) -> bool:
    return bool(torch.all(m == torch.diag(torch.diagonal(m))))


# ---------------------------------------------------------------------------------------
# Emitting layers: a JSON config plus the tensors for each.


class _Emitter:
    def __init__(self) -> None:
        self.cfgs: list[dict[str, Any]] = []
        self.tensors: list[dict[str, Tensor]] = []

    def add(self, cfg: dict[str, Any], tensors: dict[str, Tensor] | None = None) -> None:
        self.cfgs.append(cfg)
        self.tensors.append(tensors or {})

    def conv(self, cw: _Conv, bias: bool = True) -> None:
        o, i, kh, kw = cw.weight.shape
        padding = list(cw.padding)
        if cw.pad_value is not None:
            ph, pw = cw.padding
            self.add({"type": "pad", "padding": [pw, pw, ph, ph], "value": cw.pad_value})
            padding = [0, 0]
        cfg = {
            "type": "conv",
            "in": i,
            "out": o,
            "kernel": [kh, kw],
            "stride": list(cw.stride),
            "padding": padding,
            "bias": bias,
        }
        tensors = {"weight": cw.weight}
        if bias:
            tensors["bias"] = cw.bias
        else:
            assert not bool(torch.any(cw.bias != 0)), "internal: dropping a nonzero bias"
        self.add(cfg, tensors)

    def act(self, shift: float) -> None:
        self.add(_act_cfg(shift))


def _act_cfg(shift: float) -> dict[str, Any]:
    # relu(z) + c == max(z + c, c): a threshold yields the shifted activation directly.
    return {"type": "relu"} if shift == 0.0 else {"type": "threshold", "value": shift}


def _load_emitted(modules: Sequence[nn.Module], tensors: Sequence[dict[str, Tensor]]) -> None:
    for m, ts in zip(modules, tensors, strict=True):
        for name, t in ts.items():
            getattr(m, name).data.copy_(t.reshape(getattr(m, name).shape))


@dataclass
class _Plan:
    """A fused block: its config and the tensors to load into the built FusedBlock."""

    cfg: dict[str, Any]
    branch: _Emitter
    shortcut: _Emitter | None
    scale: Tensor | None
    affine: tuple[Tensor, Tensor] | None

    def build(self, dtype: torch.dtype, device: torch.device) -> FusedBlock:
        block = FusedBlock(self.cfg).to(dtype=dtype, device=device)
        self.load_into(block)
        return block

    def load_into(self, block: FusedBlock) -> None:
        _load_emitted(list(block.branch), self.branch.tensors)
        if self.shortcut is not None:
            assert block.shortcut is not None
            _load_emitted([block.shortcut], self.shortcut.tensors)
        if self.scale is not None:
            assert block.shortcut_scale is not None
            block.shortcut_scale.copy_(self.scale.reshape(block.shortcut_scale.shape))
        if self.affine is not None:
            assert block.pre_affine is not None
            block.pre_affine.weight.copy_(self.affine[0].reshape(-1, 1, 1))
            block.pre_affine.bias.copy_(self.affine[1].reshape(-1, 1, 1))


# ---------------------------------------------------------------------------------------
# Blocks.


def _fold_branch(block: ResidualBlock, c_in: Tensor, e_in: Tensor, emit: _Emitter) -> _Conv:
    """Fold the branch; emit all but the last conv, return the last conv (still open).

    The first conv's input is ``c_in * y + e_in`` per channel.
    """
    layers = block.branch_layers()
    convs = [c for c, _ in layers]
    norms = [n for _, n in layers]
    cw = _conv(convs[0])
    beta0 = _input_bias(convs[0])
    cw.take_input(c_in, e_in + beta0)
    for i in range(1, len(convs)):
        norm = norms[i - 1]
        if norm is not None:
            _fold_norm(cw, norm)
        # The next conv sees relu(z) + beta: fold beta into this conv and threshold at it.
        beta = _input_bias(convs[i])
        cw.bias = cw.bias + beta
        emit.conv(cw)
        emit.act(beta)
        cw = _conv(convs[i])
    if norms[-1] is not None:
        _fold_norm(cw, norms[-1])
    return cw


def _projection(block: ResidualBlock) -> _Conv:
    down = block.downsample
    assert down is not None
    if type(down) is not nn.Sequential or not 1 <= len(down) <= 2 or type(down[0]) is not nn.Conv2d:
        raise UsageError("cannot fuse a downsample shortcut that is not reslab's Sequential(Conv2d[, BatchNorm2d])")
    cw = _conv(down[0])
    if cw.padding != (0, 0):
        raise UsageError("cannot fuse a projection shortcut with padding")
    if len(down) == 2:
        if type(down[1]) is not nn.BatchNorm2d:
            raise UsageError("cannot fuse a downsample shortcut that is not reslab's Sequential(Conv2d[, BatchNorm2d])")
        _fold_norm(cw, down[1])
    return cw


def _fuse_plain_block(
    block: ResidualBlock, c_in: Tensor, d_in: Tensor, out_shift: float, carry: bool
) -> tuple[_Plan, Tensor, Tensor]:
    """Fold a post-activation block whose input ``x`` is stored as ``y = (x - d_in) / c_in``.

    Returns the plan and the representation ``(c_out, d_out)`` of its output. ``out_shift``
    is the Fixup input bias of the next conv (the output is stored shifted by it);
    ``carry`` allows pulling a positive shortcut gain through the ReLU into ``c_out``.
    """
    branch = _Emitter()
    g = _fold_branch(block, c_in, d_in, branch)
    channels = g.out_channels
    merge = _merge_algebra(block, channels, g.weight.device)
    _apply_gain(g, merge)
    shortcut: _Emitter | None = None
    scale: Tensor | None = None
    matmul = False
    ones = torch.ones(channels, dtype=_DT, device=g.weight.device)
    c_out = ones
    if block.downsample is not None:
        p = _projection(block)
        p.take_input(c_in, d_in)
        p.mix_out(merge.coef)
        # One bias is enough: the projection's goes into the branch's last conv.
        g.bias = g.bias + p.bias
        p.bias = torch.zeros_like(p.bias)
        shortcut = _Emitter()
        shortcut.conv(p, bias=False)
    else:
        g.bias = g.bias + merge.coef @ d_in
        if merge.coef_diagonal:
            gain = torch.diagonal(merge.coef) * c_in
            if carry and out_shift == 0.0 and _carriable(gain):
                # relu(G + L*y) == L * relu(G / L + y) for L > 0: carry L forward.
                g.scale_out(1.0 / gain)
                c_out = gain
            elif bool(torch.any(gain != 1)):
                scale = gain
        else:
            w = merge.coef * c_in[None, :]
            matmul = True
            shortcut = _Emitter()
            shortcut.conv(
                _Conv(w[:, :, None, None], torch.zeros(channels, dtype=_DT, device=w.device), (1, 1), (0, 0)),
                bias=False,
            )
    g.bias = g.bias + out_shift
    branch.conv(g)
    d_out = -out_shift * ones
    cfg = {
        "shortcut_matmul": matmul,
        "preact": False,
        "pre_affine": None,
        "branch": branch.cfgs,
        "shortcut": shortcut.cfgs[0] if shortcut is not None else None,
        "shortcut_scale": channels if scale is not None else None,
        "act": _act_cfg(out_shift),
    }
    return _Plan(cfg, branch, shortcut, scale, None), c_out, d_out


def _carriable(gain: Tensor) -> bool:
    return bool(
        torch.all(gain > 0) and torch.all(gain <= _MAX_CARRIED_GAIN) and torch.all(gain >= 1 / _MAX_CARRIED_GAIN)
    )


def _fuse_preact_block(block: ResidualBlock, input_normalized: bool, consumer: tuple[Tensor, Tensor] | None) -> _Plan:
    """Fold a pre-activation block.

    ``input_normalized``: the previous block already stored ``bn1(x)`` (possible only when
    this block has a projection shortcut, so the raw ``x`` is not needed).
    ``consumer``: the affine (next block's ``bn1`` or the final BN) to fold into this
    block's output, or None to output the raw sum.
    """
    branch = _Emitter()
    first = _first_conv(block)
    c_in = torch.ones(first.in_channels, dtype=_DT, device=first.weight.device)
    g = _fold_branch(block, c_in, torch.zeros_like(c_in), branch)
    channels = g.out_channels
    merge = _merge_algebra(block, channels, g.weight.device)
    _apply_gain(g, merge)
    input_norm = block.input_norm()
    assert input_norm is not None
    affine = None if input_normalized else _norm_affine(input_norm, first.in_channels)
    shortcut: _Emitter | None = None
    scale: Tensor | None = None
    if block.downsample is not None:
        if consumer is not None:
            g.scale_out(*consumer)
        p = _projection(block)
        p.mix_out(merge.coef)
        if consumer is not None:
            p.scale_out(consumer[0])
        g.bias = g.bias + p.bias
        p.bias = torch.zeros_like(p.bias)
        shortcut = _Emitter()
        shortcut.conv(p, bias=False)
    else:
        assert not input_normalized
        if not (
            merge.coef_diagonal
            and bool(torch.all(merge.coef == torch.eye(channels, dtype=_DT, device=g.weight.device)))
        ):
            raise UsageError("cannot fuse a pre-activation block whose merge scales the shortcut")
        if consumer is not None:
            g.scale_out(*consumer)
            if bool(torch.any(consumer[0] != 1)):
                scale = consumer[0]
    branch.conv(g)
    cfg = {
        "preact": True,
        "pre_affine": first.in_channels if affine is not None else None,
        "branch": branch.cfgs,
        "shortcut": shortcut.cfgs[0] if shortcut is not None else None,
        "shortcut_scale": channels if scale is not None else None,
        "act": None,
    }
    return _Plan(cfg, branch, shortcut, scale, affine)


# ---------------------------------------------------------------------------------------
# Validation and the public entry points.

# Layers the fuser folds by their type. Exact types: a subclass may compute something else
# in its forward. Any other layer must describe itself (see reslab.folding).
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


def _first_conv(block: ResidualBlock) -> nn.Conv2d:
    return block.branch_layers()[0][0]


def _normalizes_input(block: ResidualBlock) -> bool:
    """Whether ``block`` is pre-activation shaped: ``merge(branch(relu(norm(x))), ...)``, no ReLU after."""
    prenorm = block.input_norm() is not None
    if prenorm == block.relu_after_merge():
        raise UsageError(
            f"cannot fuse a {type(block).__name__} that "
            + ("normalizes its input and has a ReLU after the merge" if prenorm else "has no input norm and no ReLU")
        )
    return prenorm


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
            f"cannot fuse {where}: module type {type(m).__name__} is unknown to reslab.fuse, which folds reslab's "
            "ResNet, BasicBlock and Bottleneck layers and norm layers with a fold_affine(channels) method; fuse a "
            "model built by reslab.build_model"
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
    if _normalizes_input(block):
        plan = _fuse_preact_block(block, input_normalized=False, consumer=None)
    else:
        ones = torch.ones(_first_conv(block).in_channels, dtype=_DT, device=device)
        plan, _, _ = _fuse_plain_block(block, ones, torch.zeros_like(ones), out_shift=0.0, carry=False)
    return plan.build(dtype, device)


def _fuse_resnet(model: ResNet, dtype: torch.dtype, device: torch.device) -> FusedResNet:
    stages = model.stages()
    blocks: list[ResidualBlock] = [b for s in stages for b in s]
    for b in blocks:
        if not isinstance(b, ResidualBlock):
            raise UsageError(f"cannot fuse a stage member of type {type(b).__name__}")
    prenorm = [_normalizes_input(b) for b in blocks]
    preact = any(prenorm)
    if preact and not all(prenorm):
        raise UsageError("cannot fuse a ResNet mixing pre-activation and post-activation blocks")
    stem = _Emitter()
    cw = _conv(model.conv1)
    _fold_norm(cw, model.bn1)
    # The stem's output is stored shifted by the first block's Fixup input bias, if any.
    first_shift = 0.0 if preact or not blocks else _input_bias(_first_conv(blocks[0]))
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

    plans: list[_Plan] = []
    channels = model.conv1.out_channels
    c = torch.ones(channels, dtype=_DT, device=device)
    d = -first_shift * c
    head_act: dict[str, Any] | None = None
    if preact:
        final = model.final_norm
        if type(final) is not nn.Sequential or len(final) != 2 or type(final[0]) is not nn.BatchNorm2d:
            raise UsageError("cannot fuse a pre-activation ResNet without its final BN-ReLU")
        for k, b in enumerate(blocks):
            nxt = blocks[k + 1] if k + 1 < len(blocks) else None
            if nxt is None:
                consumer = _bn_affine(final[0])
            elif nxt.downsample is not None:
                nxt_norm = nxt.input_norm()
                assert nxt_norm is not None
                consumer = _norm_affine(nxt_norm, _first_conv(nxt).in_channels)
            else:
                consumer = None
            normalized = k > 0 and b.downsample is not None
            plans.append(_fuse_preact_block(b, normalized, consumer))
        head_act = {"type": "relu"}
        # The final BN went into the last block; its output is stored as it is.
        c = torch.ones(model.fc.in_features, dtype=_DT, device=device)
        d = torch.zeros_like(c)
    else:
        for k, b in enumerate(blocks):
            nxt = blocks[k + 1] if k + 1 < len(blocks) else None
            shift = _input_bias(_first_conv(nxt)) if nxt is not None else 0.0
            plan, c, d = _fuse_plain_block(b, c, d, shift, carry=True)
            plans.append(plan)

    fc = model.fc
    w = fc.weight.detach().to(_DT)
    fc_b = fc.bias.detach().to(_DT) if fc.bias is not None else torch.zeros(w.shape[0], dtype=_DT, device=device)
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
    _load_emitted(list(fused.stem), stem.tensors)
    built = [b for stage in fused.stages() for b in stage]
    for plan, block in zip(plans, built, strict=True):
        plan.load_into(block)
    fused.fc.weight.data.copy_(w)
    fused.fc.bias.data.copy_(fc_b)
    return fused


# ---------------------------------------------------------------------------------------
# Files.


def save_fused(path: str | Path, fused: FusedResNet, extra: dict[str, Any] | None = None) -> None:
    """Write a fused model as safetensors, its layout and ``extra`` (and the source spec) as metadata."""
    if not isinstance(fused, FusedResNet):
        raise UsageError("save_fused takes the FusedResNet that reslab.fuse returns for a ResNet")
    meta: dict[str, Any] = {"kind": "fused", "fused": fused.layout, **(extra or {})}
    if fused.spec is not None:
        meta["spec"] = {**fused.spec.__dict__}
    tensors = {k: v.detach().contiguous().clone() for k, v in fused.state_dict().items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={METADATA_KEY: json.dumps(meta)}))


def is_fused_file(meta: dict[str, Any]) -> bool:
    return meta.get("kind") == "fused" and "fused" in meta


def load_fused(path: str | Path, device: str | torch.device = "cpu") -> tuple[FusedResNet, dict[str, Any]]:
    """Rebuild a fused model from a :func:`save_fused` file: ``(model, metadata)``.

    Nothing is executed or unpickled: the layout is JSON and the tensors safetensors. The
    model is built on the meta device first and its shapes checked against the file, so
    a forged layout cannot make it allocate more than the file holds.
    """
    meta = read_metadata(path)
    if not is_fused_file(meta):
        raise UsageError(f"{path} is not a fused model (write one with 'reslab fuse')")
    try:
        with torch.device("meta"):
            model = FusedResNet(meta["fused"])
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
        raise UsageError(f"{path} has an invalid fused-model layout ({e}); fuse the model again") from None
    state = load_state(path, device)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))[:3]
        extra_keys = sorted(set(got) - set(expected))[:3]
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])[:3]
        raise UsageError(
            f"{path}: tensors do not match its layout (missing {missing}, unexpected {extra_keys}, "
            f"wrong shape {wrong}); fuse the model again"
        )
    model = model.to_empty(device=device)
    model.load_state_dict(state, strict=True)
    spec = meta.get("spec")
    if isinstance(spec, dict):
        try:
            model.spec = ModelSpec(**spec)
        except TypeError:
            model.spec = None
    return model.eval(), meta


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


__all__ = [
    "ChannelAffine",
    "FusedBlock",
    "FusedResNet",
    "fuse",
    "is_fused_file",
    "load_fused",
    "save_fused",
    "technique_leftovers",
]
