"""Safe, atomic files: model weights in safetensors with the model's spec as metadata.

Nothing here unpickles arbitrary objects: weights go through safetensors, and other
state (optimizer, RNG) through ``torch.load(weights_only=True)``. Every write goes to a
temporary file in the same folder, is fsynced, then renamed over the target, so a kill at
any moment leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from reslab.errors import UsageError
from reslab.models import ModelSpec, build_model

METADATA_KEY = "reslab"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask (reading it means setting it; set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)``, fsync the result, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        # mkstemp makes the file private (0600) and some writers (safetensors) create the
        # file anew with that mode: give the result the mode an ordinary open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


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
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata={METADATA_KEY: json.dumps(meta)}))


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
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise UsageError(f"{path} has corrupt reslab metadata; re-create it") from None
    return meta


def load_state(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"{path} is not a readable safetensors file ({e}); re-create it") from None


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


def torch_load_safe(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (tensors and plain containers only)."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a folder; give the file") from None
    except pickle.UnpicklingError as e:
        with open(path, "rb") as f:
            is_pickle = f.read(1) == b"\x80"  # a raw pickle (protocol >= 2), not torch's zip format
        if "GLOBAL" not in str(e) and not is_pickle:  # neither names nor looks like pickled objects: damaged
            raise UsageError(
                f"{path} is truncated or not a torch file ({str(e).splitlines()[0][:120]}); "
                "re-create it (a run's checkpoint: start the run again with --overwrite)"
            ) from None
        # the weights-only unpickler met something other than tensors and plain containers
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise UsageError(
            f"{path} cannot be loaded safely: it holds Python objects other than tensors and plain containers"
            f"{what}; reslab never unpickles code: re-save it as a plain state dict or .safetensors"
        ) from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for bad files
        raise UsageError(
            f"{path} is truncated or not a torch file ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            "re-create it (a run's checkpoint: start the run again with --overwrite)"
        ) from None
