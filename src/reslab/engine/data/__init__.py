"""Datasets: in-memory image arrays (fashion-mnist, cifar10, cifar100, digits) and
streamed image folders (``folder:PATH``).

In-memory datasets come back as an :class:`ArrayDataset` of uint8 ``N x C x H x W``
tensors, so the training engine can keep them on the device and augment whole batches
there. Every file is validated before it is trusted: IDX magic numbers, dimensions,
lengths and the known checksums of the official files, so a truncated or corrupted
download is one clear :class:`~reslab.errors.UsageError`, not a crash deep in numpy.

A ``data_dir`` given by the user is the only place looked at: if it does not exist or
does not hold the dataset, that is an error naming the folder and the files looked for
(nothing is downloaded into it, and no other copy is used silently). Without
``data_dir``, fashion-mnist is looked for, in order, in ``$RESLAB_DATA/fashion-mnist``,
``~/.cache/reslab/fashion-mnist`` and ``/usr/share/datasets/fashion-mnist`` (Debian's
``dataset-fashion-mnist``); CIFAR in ``$RESLAB_DATA`` and the user cache, in
torchvision's on-disk format (``cifar-10-batches-py``, ``cifar-100-python``). When
nothing is found there, the official files are downloaded into the user cache and
checked, one process at a time (two commands started together download once; see
:mod:`.download`); offline, the error names the places looked and the fixes.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from reslab.caches import new_cache
from reslab.engine.data.base import DATASETS, ArrayDataset, search_dirs
from reslab.engine.data.cifar import CIFAR, load_cifar
from reslab.engine.data.digits import load_digits
from reslab.engine.data.fashion import load_fashion, parse_idx
from reslab.engine.data.folder import FolderDataset, load_folder
from reslab.errors import UsageError

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "FolderDataset",
    "load_arrays",
    "open_dataset",
    "parse_idx",
    "search_dirs",
]


# Decoding and checksumming fashion-mnist takes seconds; a comparison trains many runs in
# one process, so the last dataset loaded is kept (tensors are never modified in place).
_DECODED_DATASETS: dict[tuple[Any, ...], ArrayDataset] = new_cache("datasets.decoded")


def _file_stamps(name: str, data_dir: str | Path | None) -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime) of the candidate files, so a changed file is re-read and re-checked."""
    stamps = []
    for d in search_dirs(name, data_dir):
        if d.is_dir():
            for p in sorted(d.rglob("*")):
                if p.is_file():
                    st = p.stat()
                    stamps.append((str(p), st.st_size, st.st_mtime_ns))
    return tuple(stamps)


def load_arrays(
    name: str, data_dir: str | Path | None = None, *, download: bool = True, verify: bool = True
) -> ArrayDataset:
    """Load an in-memory dataset by name: ``fashion-mnist``, ``cifar10``, ``cifar100``, ``digits``.

    ``data_dir`` is looked at first. ``verify=False`` skips the checksums of the official
    files (for hand-made files in the same format); structure is always validated.
    """
    if name in ("fashion-mnist", *CIFAR):
        key = (name, str(data_dir), verify, os.environ.get("RESLAB_DATA"), _file_stamps(name, data_dir))
        if key not in _DECODED_DATASETS:
            loader = load_fashion if name == "fashion-mnist" else lambda *a: load_cifar(name, *a)
            _DECODED_DATASETS.clear()  # one dataset at a time: a sweep over datasets should not pile them up
            _DECODED_DATASETS[key] = loader(data_dir, download, verify)
        return dataclasses.replace(_DECODED_DATASETS[key])
    if name == "digits":
        return load_digits()
    if name.startswith("folder:"):
        raise UsageError(f"{name} is streamed, not loaded into memory; use reslab.engine.data.open_dataset")
    raise UsageError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}, folder:PATH")


def open_dataset(
    name: str, data_dir: str | Path | None = None, *, download: bool = True, verify: bool = True
) -> ArrayDataset | FolderDataset:
    """:func:`load_arrays` for in-memory datasets, :func:`load_folder` for ``folder:PATH``."""
    if name.startswith("folder:"):
        return load_folder(name[len("folder:") :])
    return load_arrays(name, data_dir, download=download, verify=verify)
