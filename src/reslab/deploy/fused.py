"""The fused model and its file: a plain-conv ResNet rebuilt from a JSON *layout* (the layer
list) plus its tensors, saved as safetensors and loaded without executing or unpickling
anything (:func:`save_fused` writes the format, :func:`load_fused` reads it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reslab.errors import UsageError
from reslab.files import load_state
from reslab.nn.models import ModelSpec
from reslab.nn.weights import read_metadata, write_tensors

LAYOUT_FORMAT = "reslab-fused"


LAYOUT_VERSION = 1


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


def build_layer(cfg: dict[str, Any]) -> nn.Module:
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
        self.branch = nn.Sequential(*(build_layer(c) for c in cfg["branch"]))
        self.shortcut = build_layer(cfg["shortcut"]) if cfg.get("shortcut") else None
        scale = cfg.get("shortcut_scale")
        if scale is None:
            self.register_buffer("shortcut_scale", None)
        else:
            self.register_buffer("shortcut_scale", torch.ones(int(scale), 1, 1))
        self.act = build_layer(cfg["act"]) if cfg.get("act") else None
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
        check_layout(layout)
        self.layout = layout
        self.stem = nn.Sequential(*(build_layer(c) for c in layout["stem"]))
        self.num_stages = len(layout["stages"])
        for i, stage in enumerate(layout["stages"]):
            self.add_module(f"layer{i + 1}", nn.Sequential(*(FusedBlock(b) for b in stage)))
        head = layout["head"]
        self.head_act = build_layer(head["act"]) if head.get("act") else None
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


def check_layout(layout: Any) -> None:
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


def save_fused(path: str | Path, fused: FusedResNet, extra: dict[str, Any] | None = None) -> None:
    """Write a fused model as safetensors, its layout and ``extra`` (and the source spec) as metadata."""
    if not isinstance(fused, FusedResNet):
        raise UsageError("save_fused takes the FusedResNet that reslab.fuse() returns for a ResNet")
    meta: dict[str, Any] = {"kind": "fused", "fused": fused.layout, **(extra or {})}
    if fused.spec is not None:
        meta["spec"] = {**fused.spec.__dict__}
    write_tensors(path, fused.state_dict(), meta)


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
