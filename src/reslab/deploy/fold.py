"""Folding one residual block: BatchNorm into the conv before it, the technique's merge into
the branch's last conv and the shortcut, in float64 (see :mod:`reslab.deploy.fuse` for the
rules). Produces a :class:`BlockPlan`: the fused layers of the block and the per-channel gain
carried into the next one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from reslab.deploy.fused import FusedBlock
from reslab.errors import UsageError
from reslab.nn.blocks import ResidualBlock
from reslab.nn.folding import FOLD_DTYPE, bn_affine, fold_is_current
from reslab.nn.techniques import merge_fold

# A positive shortcut gain carried through ReLUs is kept inside this range, so that the
# activations it rescales stay far from float32 overflow and underflow.
_MAX_CARRIED_GAIN = 1e6


@dataclass
class FoldedConv:
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


def folded_conv(m: nn.Conv2d) -> FoldedConv:
    if m.groups != 1 or tuple(m.dilation) != (1, 1) or m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise UsageError(
            f"cannot fuse conv {m}: only groups=1, dilation=1, zero padding given as numbers are supported"
        )
    w = m.weight.detach().to(FOLD_DTYPE).clone()
    b = (
        m.bias.detach().to(FOLD_DTYPE).clone()
        if m.bias is not None
        else torch.zeros(w.shape[0], dtype=FOLD_DTYPE, device=w.device)
    )
    return FoldedConv(w, b, tuple(m.stride), tuple(m.padding))  # type: ignore[arg-type]


def _fold_norm(cw: FoldedConv, norm: nn.Module) -> None:
    """Fold the normalization layer that follows a conv into it.

    BatchNorm is folded from its statistics; any other norm layer must describe itself
    with ``fold_affine(channels) -> (scale, shift)`` (see :mod:`reslab.nn.folding`).
    """
    if not isinstance(norm, nn.Identity):
        cw.scale_out(*_norm_affine(norm, cw.out_channels))


def _norm_affine(norm: nn.Module, channels: int) -> tuple[Tensor, Tensor]:
    """An eval-mode norm layer as ``(scale, shift)`` per channel, in float64."""
    if isinstance(norm, nn.BatchNorm2d):
        return bn_affine(norm)
    if _describes(norm, "fold_affine"):
        a, b = norm.fold_affine(channels)  # type: ignore[operator]
        return torch.as_tensor(a, dtype=FOLD_DTYPE), torch.as_tensor(b, dtype=FOLD_DTYPE)
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
        t = torch.as_tensor(v, dtype=FOLD_DTYPE).to(device)
        if t.numel() == 1:
            return torch.eye(channels, dtype=FOLD_DTYPE, device=device) * t.reshape(()), True
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
    shift = torch.as_tensor(fold.shift, dtype=FOLD_DTYPE).to(device)
    if shift.numel() == 1:
        shift = shift.reshape(()).expand(channels)
    if shift.shape != (channels,):
        raise UsageError(f"{where} gave a shift of shape {tuple(shift.shape)}; expected a number or ({channels},)")
    return _Merge(gain, shift, coef, diagonal)


def _apply_gain(cw: FoldedConv, m: _Merge) -> None:
    if _is_diagonal(m.gain):
        cw.scale_out(torch.diagonal(m.gain), m.shift)
    else:
        cw.mix_out(m.gain, m.shift)


def _is_diagonal(m: Tensor) -> bool:
    return bool(torch.all(m == torch.diag(torch.diagonal(m))))


class Emitter:
    def __init__(self) -> None:
        self.cfgs: list[dict[str, Any]] = []
        self.tensors: list[dict[str, Tensor]] = []

    def add(self, cfg: dict[str, Any], tensors: dict[str, Tensor] | None = None) -> None:
        self.cfgs.append(cfg)
        self.tensors.append(tensors or {})

    def conv(self, cw: FoldedConv, bias: bool = True) -> None:
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
        self.add(act_cfg(shift))


def act_cfg(shift: float) -> dict[str, Any]:
    # relu(z) + c == max(z + c, c): a threshold yields the shifted activation directly.
    return {"type": "relu"} if shift == 0.0 else {"type": "threshold", "value": shift}


def load_emitted(modules: Sequence[nn.Module], tensors: Sequence[dict[str, Tensor]]) -> None:
    for m, ts in zip(modules, tensors, strict=True):
        for name, t in ts.items():
            getattr(m, name).data.copy_(t.reshape(getattr(m, name).shape))


@dataclass
class BlockPlan:
    """A fused block: its config and the tensors to load into the built FusedBlock."""

    cfg: dict[str, Any]
    branch: Emitter
    shortcut: Emitter | None
    scale: Tensor | None
    affine: tuple[Tensor, Tensor] | None

    def build(self, dtype: torch.dtype, device: torch.device) -> FusedBlock:
        block = FusedBlock(self.cfg).to(dtype=dtype, device=device)
        self.load_into(block)
        return block

    def load_into(self, block: FusedBlock) -> None:
        load_emitted(list(block.branch), self.branch.tensors)
        if self.shortcut is not None:
            assert block.shortcut is not None
            load_emitted([block.shortcut], self.shortcut.tensors)
        if self.scale is not None:
            assert block.shortcut_scale is not None
            block.shortcut_scale.copy_(self.scale.reshape(block.shortcut_scale.shape))
        if self.affine is not None:
            assert block.pre_affine is not None
            block.pre_affine.weight.copy_(self.affine[0].reshape(-1, 1, 1))
            block.pre_affine.bias.copy_(self.affine[1].reshape(-1, 1, 1))


def fold_branch(block: ResidualBlock, c_in: Tensor, e_in: Tensor, emit: Emitter) -> FoldedConv:
    """Fold the branch; emit all but the last conv, return the last conv (still open).

    The first conv's input is ``c_in * y + e_in`` per channel.
    """
    layers = block.branch_layers()
    convs = [c for c, _ in layers]
    norms = [n for _, n in layers]
    cw = folded_conv(convs[0])
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
        cw = folded_conv(convs[i])
    if norms[-1] is not None:
        _fold_norm(cw, norms[-1])
    return cw


def projection_conv(block: ResidualBlock) -> FoldedConv:
    down = block.downsample
    assert down is not None
    if type(down) is not nn.Sequential or not 1 <= len(down) <= 2 or type(down[0]) is not nn.Conv2d:
        raise UsageError("cannot fuse a downsample shortcut that is not reslab's Sequential(Conv2d[, BatchNorm2d])")
    cw = folded_conv(down[0])
    if cw.padding != (0, 0):
        raise UsageError("cannot fuse a projection shortcut with padding")
    if len(down) == 2:
        if type(down[1]) is not nn.BatchNorm2d:
            raise UsageError("cannot fuse a downsample shortcut that is not reslab's Sequential(Conv2d[, BatchNorm2d])")
        _fold_norm(cw, down[1])
    return cw


def fuse_plain_block(
    block: ResidualBlock, c_in: Tensor, d_in: Tensor, out_shift: float, carry: bool
) -> tuple[BlockPlan, Tensor, Tensor]:
    """Fold a post-activation block whose input ``x`` is stored as ``y = (x - d_in) / c_in``.

    Returns the plan and the representation ``(c_out, d_out)`` of its output. ``out_shift``
    is the Fixup input bias of the next conv (the output is stored shifted by it);
    ``carry`` allows pulling a positive shortcut gain through the ReLU into ``c_out``.
    """
    branch = Emitter()
    g = fold_branch(block, c_in, d_in, branch)
    channels = g.out_channels
    merge = _merge_algebra(block, channels, g.weight.device)
    _apply_gain(g, merge)
    shortcut: Emitter | None = None
    scale: Tensor | None = None
    matmul = False
    ones = torch.ones(channels, dtype=FOLD_DTYPE, device=g.weight.device)
    c_out = ones
    if block.downsample is not None:
        p = projection_conv(block)
        p.take_input(c_in, d_in)
        p.mix_out(merge.coef)
        # One bias is enough: the projection's goes into the branch's last conv.
        g.bias = g.bias + p.bias
        p.bias = torch.zeros_like(p.bias)
        shortcut = Emitter()
        shortcut.conv(p, bias=False)
    else:
        g.bias = g.bias + merge.coef @ d_in
        if merge.coef_diagonal:
            gain = torch.diagonal(merge.coef) * c_in
            if carry and out_shift == 0.0 and carriable(gain):
                # relu(G + L*y) == L * relu(G / L + y) for L > 0: carry L forward.
                g.scale_out(1.0 / gain)
                c_out = gain
            elif bool(torch.any(gain != 1)):
                scale = gain
        else:
            w = merge.coef * c_in[None, :]
            matmul = True
            shortcut = Emitter()
            shortcut.conv(
                FoldedConv(
                    w[:, :, None, None], torch.zeros(channels, dtype=FOLD_DTYPE, device=w.device), (1, 1), (0, 0)
                ),
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
        "act": act_cfg(out_shift),
    }
    return BlockPlan(cfg, branch, shortcut, scale, None), c_out, d_out


def carriable(gain: Tensor) -> bool:
    return bool(
        torch.all(gain > 0) and torch.all(gain <= _MAX_CARRIED_GAIN) and torch.all(gain >= 1 / _MAX_CARRIED_GAIN)
    )


def fuse_preact_block(
    block: ResidualBlock, input_normalized: bool, consumer: tuple[Tensor, Tensor] | None
) -> BlockPlan:
    """Fold a pre-activation block.

    ``input_normalized``: the previous block already stored ``bn1(x)`` (possible only when
    this block has a projection shortcut, so the raw ``x`` is not needed).
    ``consumer``: the affine (next block's ``bn1`` or the final BN) to fold into this
    block's output, or None to output the raw sum.
    """
    branch = Emitter()
    first = first_conv(block)
    c_in = torch.ones(first.in_channels, dtype=FOLD_DTYPE, device=first.weight.device)
    g = fold_branch(block, c_in, torch.zeros_like(c_in), branch)
    channels = g.out_channels
    merge = _merge_algebra(block, channels, g.weight.device)
    _apply_gain(g, merge)
    input_norm = block.input_norm()
    assert input_norm is not None
    affine = None if input_normalized else _norm_affine(input_norm, first.in_channels)
    shortcut: Emitter | None = None
    scale: Tensor | None = None
    if block.downsample is not None:
        if consumer is not None:
            g.scale_out(*consumer)
        p = projection_conv(block)
        p.mix_out(merge.coef)
        if consumer is not None:
            p.scale_out(consumer[0])
        g.bias = g.bias + p.bias
        p.bias = torch.zeros_like(p.bias)
        shortcut = Emitter()
        shortcut.conv(p, bias=False)
    else:
        assert not input_normalized
        if not (
            merge.coef_diagonal
            and bool(torch.all(merge.coef == torch.eye(channels, dtype=FOLD_DTYPE, device=g.weight.device)))
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
    return BlockPlan(cfg, branch, shortcut, scale, affine)


def first_conv(block: ResidualBlock) -> nn.Conv2d:
    return block.branch_layers()[0][0]


def normalizes_input(block: ResidualBlock) -> bool:
    """Whether ``block`` is pre-activation shaped: ``merge(branch(relu(norm(x))), ...)``, no ReLU after."""
    prenorm = block.input_norm() is not None
    if prenorm == block.relu_after_merge():
        raise UsageError(
            f"cannot fuse a {type(block).__name__} that "
            + ("normalizes its input and has a ReLU after the merge" if prenorm else "has no input norm and no ReLU")
        )
    return prenorm
