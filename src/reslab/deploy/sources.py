"""What ``reslab fuse``, ``export`` and ``predict`` read, all data and never code: a run
folder (``RUN/model.safetensors``), a reslab weights file (``.safetensors`` with the model
spec in its metadata), or a fused model (``.safetensors`` written by ``reslab fuse``:
tensors plus a JSON layout)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.deploy.fuse import fuse
from reslab.deploy.fused import FusedResNet, is_fused_file, load_fused
from reslab.errors import UsageError
from reslab.nn.weights import load_model, read_metadata
from reslab.version import __version__

#: the name of the metadata an exported file carries (a zip entry, or an ONNX property)
META_NAME = "reslab.json"


def weights_path(source: str | Path) -> Path:
    """``source`` itself, or ``source/model.safetensors`` for a run folder."""
    p = Path(source)
    if p.is_dir():
        w = p / "model.safetensors"
        if not w.is_file():
            raise UsageError(
                f"run folder {p} has no model.safetensors (the run did not complete); finish it with "
                f"'reslab train --resume --out {p}' or pass a weights file"
            )
        return w
    if not p.exists():
        raise UsageError(f"{p} does not exist; pass a run folder or a .safetensors weights file")
    return p


def load_source(source: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a run folder, reslab weights file or fused file: ``(eval model, metadata)``.

    The model is a reslab ResNet, or a :class:`~reslab.deploy.fuse.FusedResNet` for a fused file.
    """
    path = weights_path(source)
    if path.suffix != ".safetensors":
        raise UsageError(f"{path} is not a .safetensors file; pass a run folder or reslab weights")
    meta = read_metadata(path)
    if is_fused_file(meta):
        model, meta = load_fused(path, device)
        return model, meta
    return load_model(path, device).eval(), meta


def fused_source(source: str | Path, device: str | torch.device = "cpu") -> tuple[FusedResNet, dict[str, Any]]:
    """The fused model of a run folder / weights file / fused file, with its metadata."""
    model, meta = load_source(source, device)
    if isinstance(model, FusedResNet):
        return model, meta
    fused = fuse(model)
    assert isinstance(fused, FusedResNet)
    return fused, meta


def export_metadata(model: nn.Module, meta: dict[str, Any], input_size: Sequence[int] | None = None) -> dict[str, Any]:
    """The metadata carried by exported files.

    ``input_size`` overrides (or supplies, for files without it) the ``[C, H, W]`` input.
    """
    spec = meta.get("spec") or {}
    size = list(input_size) if input_size is not None else meta.get("input_size")
    if size is None:
        raise UsageError(
            "the weights have no input_size in their metadata (not written by 'reslab train'); pass --input-size CxHxW"
        )
    in_channels = spec.get("in_channels")
    if in_channels is not None and int(size[0]) != int(in_channels):
        raise UsageError(
            f"input size {size} has {size[0]} channels but the model takes {in_channels}; fix --input-size"
        )
    num_classes = spec.get("num_classes")
    classes = meta.get("classes")
    if classes is None and num_classes is not None:
        classes = [str(i) for i in range(int(num_classes))]
    channels = int(size[0])
    return {
        "reslab_version": __version__,
        "model": spec.get("name"),
        "technique": spec.get("technique"),
        "spec": spec,
        "fused": isinstance(model, FusedResNet),
        "input_size": [int(s) for s in size],
        "dataset": meta.get("dataset"),
        "classes": classes,
        "mean": meta.get("mean", [0.0] * channels),
        "std": meta.get("std", [1.0] * channels),
    }
