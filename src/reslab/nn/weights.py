"""Model weight files: safetensors with the model's spec as metadata, so that a file
rebuilds its own model. Written atomically (:func:`reslab.files.atomic_write`); nothing
here unpickles anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from torch import nn

from reslab.errors import UsageError
from reslab.files import atomic_write, load_state
from reslab.nn.models import ModelSpec, build_model

METADATA_KEY = "reslab"


def spec_of(model: nn.Module) -> ModelSpec:
    spec = getattr(model, "spec", None)
    if not isinstance(spec, ModelSpec):
        raise ValueError("model has no reslab spec: build it with reslab.build_model")
    return spec


def save_weights(path: str | Path, model: nn.Module, extra: dict[str, Any] | None = None) -> None:
    """Save ``model``'s state dict as safetensors, with its spec (and ``extra``) as metadata."""
    spec = spec_of(model)
    meta = {"spec": {**spec.__dict__}, **(extra or {})}
    # safetensors refuses shared or non-contiguous storage; a clone per tensor is cheap here.
    write_tensors(path, model.state_dict(), meta)


def write_tensors(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """The one writer of reslab's safetensors files: ``state`` as tensors, ``meta`` as the metadata."""
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={METADATA_KEY: encode_metadata(meta)}))


def encode_metadata(meta: dict[str, Any]) -> str:
    """reslab's metadata as the text stored beside a model (safetensors, TorchScript, ONNX)."""
    return json.dumps(meta, allow_nan=False)


def decode_metadata(raw: str | bytes, path: str | Path, again: str = "re-create it") -> dict[str, Any]:
    """The metadata :func:`encode_metadata` wrote, or a one-line error naming ``path`` and the fix."""
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict):
        raise UsageError(f"{path} has corrupt reslab metadata; {again}")
    return meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The reslab metadata of a safetensors file (clear error if absent or unreadable)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"{path} is not a readable safetensors file ({e}); re-create it") from None
    if raw is None:
        raise UsageError(f"{path} has no reslab metadata: it was not written by reslab")
    return decode_metadata(raw, path)


def spec_from_metadata(meta: dict[str, Any], path: str | Path = "?") -> ModelSpec:
    try:
        return ModelSpec(**meta["spec"])
    except (KeyError, TypeError):
        raise UsageError(f"{path} has no valid model spec in its metadata") from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model a safetensors file was saved from and load its weights strictly."""
    meta = read_metadata(path)
    spec = spec_from_metadata(meta, path)
    try:
        model = build_model(**spec.as_kwargs())
    except ValueError as e:
        raise UsageError(f"{path}: cannot rebuild its model ({e})") from None
    load_into(model, load_state(path, device), path)
    return model.to(device)


def load_into(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path = "?") -> None:
    """Strictly load ``state`` into ``model``, as a one-line error when they don't match."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise UsageError(f"{path} does not match the model ({detail})") from None
