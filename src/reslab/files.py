"""Safe, atomic files, for every layer.

Every write goes to a temporary file in the same folder, is fsynced, then renamed over the
target, so a kill at any moment leaves either the old file or the new one, never a torn
one. Nothing here unpickles arbitrary objects: :func:`torch_load_safe` reads only tensors
and plain containers (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reslab.errors import UsageError


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


def load_state(path: str | Path, device: Any = "cpu") -> dict[str, Any]:
    """The tensors of a safetensors file (a one-line error when it is unreadable)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"{path} is not a readable safetensors file ({e}); re-create it") from None


def torch_load_safe(path: str | Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (tensors and plain containers only)."""
    import torch  # only the readers of torch files pay for importing it

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
