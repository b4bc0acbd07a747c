"""Safe, atomic files, for every layer.

Every write goes to a temporary file in the same folder, is fsynced, then renamed over the
target, so a kill at any moment leaves either the old file or the new one, never a torn
one. Nothing here unpickles arbitrary objects: :func:`torch_load_safe` reads only tensors
and plain containers (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import errno
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


#: what to do about a write that failed, by errno
_WRITE_FIXES = {
    errno.ENOSPC: "free some disk space there and re-run the same command",
    errno.EDQUOT: "free some of your disk quota there and re-run the same command",
    errno.EFBIG: "raise the file-size limit (ulimit -f) or write to a file system that allows larger files, "
    "then re-run the same command",
    errno.EROFS: "the file system is read-only: choose a writable folder (--out)",
    errno.EACCES: "you may not write there: choose a writable folder (--out) or fix its permissions",
    errno.EPERM: "you may not write there: choose a writable folder (--out) or fix its permissions",
}


class WriteError(UsageError):
    """A file reslab writes could not be written (disk full, a size limit, a read-only or foreign
    folder): one line naming the file, the cause and the fix; nothing is left under its name."""


def write_error(path: Path, exc: BaseException) -> WriteError | None:
    """The :class:`WriteError` a failed write of ``path`` means, or None when ``exc`` is not a
    failure to write (a bug, an interrupt). Writers report errno differently: ``OSError`` has it,
    safetensors puts "(os error N)" in its message, torch.save says it "failed writing"."""
    code: int | None = None
    if isinstance(exc, OSError) and exc.errno is not None:
        code = exc.errno
    elif m := re.search(r"\(os error (\d+)\)", str(exc)):
        code = int(m.group(1))
    elif "failed writing" in str(exc) or "file write failed" in str(exc):
        return WriteError(
            f"could not write {path}: the write failed (a full disk or a file-size limit?); free space or raise the "
            "limit and re-run the same command"
        )
    if code is None:
        return None
    cause = os.strerror(code)
    fix = _WRITE_FIXES.get(code, "check the folder and re-run the same command")
    return WriteError(f"could not write {path}: {cause} ({errno.errorcode.get(code, code)}); {fix}")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)``, fsync the result, then rename it to ``path``. A write that fails
    for want of space, size or permission is a :class:`WriteError` naming ``path``; the
    temporary file is removed and whatever was at ``path`` before stays as it was."""
    path = Path(path)
    try:
        _atomic_write(path, write)
    except Exception as e:  # classified below; anything else is raised as it was
        if isinstance(e, UsageError):
            raise
        err = write_error(path, e)
        if err is None:
            raise
        raise err from None


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
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
