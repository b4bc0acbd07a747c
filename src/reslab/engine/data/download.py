"""Dataset downloads that stay correct when several processes fetch the same file at once.

torchvision's dataset utilities move the bytes and check them (:func:`download_url`,
:func:`check_integrity`); this module adds what they lack when two commands start on one
machine together (two runs of a grid, two terminals):

* an exclusive ``fcntl.flock`` on ``.NAME.lock`` next to the target is held while the file is
  checked and fetched, so a second process waits, then finds the verified file and uses it
  instead of downloading it again; the kernel drops the lock when its holder dies, so a killed
  download never leaves a stale lock (the lock file itself stays: removing it while another
  process may hold it open would let two processes lock two different files);
* each download is written to its own temporary file in the target's folder
  (``.NAME.<pid>.<random>.part``), checked by MD5 and only then renamed into place, so a reader
  never sees half a file and a failed download leaves nothing behind; a ``.part`` left by a
  killed process is removed by the next holder of the lock (only a holder writes one);
* a file already in place that fails its MD5 is downloaded again and replaced.

Errors: a bad checksum or a folder that cannot be written is a one-line :class:`UsageError`
naming the fix; a network failure is the ``OSError`` urllib raises (``URLError`` and socket
errors), which the dataset loaders turn into their "not found ... download failed" line.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.error import URLError

from torchvision.datasets.utils import calculate_md5, check_integrity, download_url

from reslab.errors import UsageError

#: seconds a connection or a read may stall before the download fails (torchvision sets none)
TIMEOUT_S = 30.0

# errors of the local disk, not of the network, while a download is written
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})


def _unwritable(target: Path, e: OSError) -> UsageError:
    problem = (e.strerror or str(e) or type(e).__name__).lower()
    return UsageError(
        f"cannot save {target} ({problem}: {e.filename or target.parent}); make {target.parent} writable "
        "(or set $XDG_CACHE_HOME to a writable folder), or pass --data-dir to a folder that holds the dataset"
    )


def remove_leftovers(target: Path) -> None:
    """Remove the temporary files and folders (``.NAME.*.part``) of earlier attempts at
    ``target``; call it only while holding :func:`file_lock` on ``target``."""
    for p in target.parent.glob(f".{glob.escape(target.name)}.*.part"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def file_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``target`` (through ``.NAME.lock`` beside it), waiting for
    another process that holds it; creates ``target``'s folder when missing."""
    import fcntl  # POSIX only, like the run folder's lock (reslab.engine.runs.RunLock)

    lock = target.with_name(f".{target.name}.lock")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise _unwritable(target, e) from None
    try:
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another process to finish fetching {target} ...", file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a file system without flock (some network ones)
            raise UsageError(
                f"cannot lock {lock} ({(e.strerror or str(e)).lower()}); set $XDG_CACHE_HOME to a folder on a "
                "local disk, or pass --data-dir to a folder that holds the dataset"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """A default timeout for the sockets opened inside (torchvision's urlopen takes none),
    unless the program has set one of its own."""
    if socket.getdefaulttimeout() is not None:
        yield
        return
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(None)


def fetch_file(url: str, dest: Path, md5: str) -> Path:
    """``dest``, verified against ``md5``: the file already there when it passes, otherwise
    fetched from ``url`` (see the module's notes on concurrent callers)."""
    if check_integrity(dest, md5):
        return dest  # a file in place is only ever replaced whole, so no lock is needed to read it
    with file_lock(dest):
        if check_integrity(dest, md5):
            return dest  # fetched by the process this one waited for
        remove_leftovers(dest)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
        try:
            with _socket_timeout(TIMEOUT_S):
                download_url(url, str(dest.parent), tmp.name, md5)
            os.replace(tmp, dest)
        except RuntimeError as e:  # torchvision's "File not found or corrupted." after the transfer
            if not tmp.is_file():
                raise URLError(str(e)) from None  # e.g. too many redirects: a failed download
            raise UsageError(
                f"download of {url} has md5 {calculate_md5(tmp)}, expected {md5} (the server sent another file); "
                "try again later, or pass --data-dir to a folder that holds the dataset"
            ) from None
        except OSError as e:
            if not isinstance(e, URLError) and e.errno in _DISK_ERRNOS:
                raise _unwritable(dest, e) from None
            raise
        finally:
            tmp.unlink(missing_ok=True)
    return dest
