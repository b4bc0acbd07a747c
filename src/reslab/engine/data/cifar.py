"""CIFAR-10 and CIFAR-100 in their Python-version batches, read without unpickling any
object (a restricted unpickler that only builds plain containers, bytes and numbers)."""

from __future__ import annotations

import pickle
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from reslab.engine.data.base import (
    ArrayDataset,
    cache_dir,
    channel_stats,
    check_labels,
    given_dir_error,
    md5_of,
    search_dirs,
)
from reslab.engine.data.download import fetch_file, file_lock, remove_leftovers
from reslab.errors import UsageError

# torchvision's CIFAR archives and the md5 of every file inside (its own table).
CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "tgz_md5": "c58f30108f718f92721af3b95e74349a",
        "train": [
            ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
            ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
            ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
            ("data_batch_4", "634d18415352ddfa80567beed471001a"),
            ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
        ],
        "test": [("test_batch", "40351d587109b95175f43aff81a1287e")],
        "meta": ("batches.meta", "label_names", "5ff9c542aee3614f3951f8cda6e48888"),
        "label_key": "labels",
        "num_classes": 10,
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "tgz_md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "train": [("train", "16019d7e3df5f24257cddd939b257f8d")],
        "test": [("test", "f0ef6b0ae62326f3e7ffdfab6717acfc")],
        "meta": ("meta", "fine_label_names", "7973b15100ade9c7d40fb424638fde48"),
        "label_key": "fine_labels",
        "num_classes": 100,
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
    },
}


class _PlainUnpickler(pickle.Unpickler):
    """CIFAR batches are pickled dicts of numpy arrays; refuse anything that is code."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load_cifar_batch(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            d = _PlainUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as e:
        raise UsageError(f"{path} is not a valid CIFAR batch ({e}); delete it and fetch it again") from None
    if not isinstance(d, dict):
        raise UsageError(f"{path} is not a valid CIFAR batch; delete it and fetch it again")
    return d


def _cifar_from(folder: Path, info: dict[str, Any], verify: bool) -> ArrayDataset | None:
    base = folder / info["folder"]
    files = info["train"] + info["test"] + [info["meta"][::2]]
    if not all((base / f).is_file() for f, _ in files):
        return None
    if verify:
        for f, md5 in files:
            if md5_of(base / f) != md5:
                raise UsageError(
                    f"{base / f} fails its checksum (not the official file); delete it and fetch it again, "
                    "or load it with verify=False"
                )
    parts: dict[str, tuple[Tensor, Tensor]] = {}
    for split in ("train", "test"):
        xs, ys = [], []
        for f, _ in info[split]:
            d = _load_cifar_batch(base / f)
            try:
                data = np.asarray(d["data"], dtype=np.uint8)
                labels = np.asarray(d[info["label_key"]], dtype=np.int64)
                data = data.reshape(-1, 3, 32, 32)
            except (KeyError, ValueError) as e:
                raise UsageError(f"{base / f} is not a valid CIFAR batch ({e}); delete it and fetch it again") from None
            if len(data) != len(labels):
                raise UsageError(f"{base / f} has {len(data)} images but {len(labels)} labels; fetch it again")
            xs.append(data)
            ys.append(labels)
        parts[split] = (torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))
    meta = _load_cifar_batch(base / info["meta"][0])
    classes = tuple(str(c) for c in meta.get(info["meta"][1], []))
    n = info["num_classes"]
    if len(classes) != n:
        raise UsageError(f"{base / info['meta'][0]} lists {len(classes)} classes, expected {n}; fetch it again")
    check_labels(parts["train"][1], parts["test"][1], n, info["folder"])
    # The published statistics of the official sets; recomputed for other (e.g. test) files.
    mean, std = (info["mean"], info["std"]) if verify else channel_stats(parts["train"][0])
    return ArrayDataset(
        "cifar10" if n == 10 else "cifar100", *parts["train"], *parts["test"], n, classes, mean, std, True, 4
    )


def _extract(archive: Path, target: Path, folder: str) -> None:
    """Unpack ``archive``'s ``folder`` into ``target`` through a temporary folder beside it,
    renamed into place whole: a reader never sees half a tree. Call it holding
    ``file_lock(target / folder)``. (torchvision's ``extract_archive`` unpacks in place and
    without tarfile's ``data`` filter, which refuses members that would land outside the folder;
    Pythons before 3.11.4 lack the filter, and there the archive's checked MD5 is the guard.)"""
    final = target / folder
    remove_leftovers(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.", suffix=".part", dir=target))
    try:
        with tarfile.open(archive, "r:gz") as tf:
            tf.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        if final.exists():  # an incomplete tree (ours are renamed in whole; an older one may not be)
            final.rename(tmp / "incomplete")
        (tmp / folder).rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch_cifar(info: dict[str, Any], target: Path, verify: bool) -> ArrayDataset | None:
    """Download and unpack ``info``'s archive into ``target``, one process at a time: one that
    waited finds the tree the other unpacked and downloads nothing."""
    with file_lock(target / info["folder"]):
        ds = _cifar_from(target, info, verify)
        if ds is None:
            archive = fetch_file(info["url"], target / Path(info["url"]).name, info["tgz_md5"])
            _extract(archive, target, info["folder"])
            ds = _cifar_from(target, info, verify)
    return ds


def load_cifar(name: str, data_dir: str | Path | None, download: bool, verify: bool) -> ArrayDataset:
    info = CIFAR[name]
    dirs = search_dirs(name, data_dir)
    for d in dirs:
        ds = _cifar_from(d, info, verify)
        if ds is not None:
            return ds
    if data_dir is not None:
        raise given_dir_error(name, dirs[0], f"{info['folder']}/ in torchvision's format")
    target = cache_dir() / name
    err = ""
    if download:
        try:
            ds = _fetch_cifar(info, target, verify)
            if ds is not None:
                return ds
        except (OSError, tarfile.TarError) as e:  # URLError and socket errors are OSErrors
            err = f"; download failed ({getattr(e, 'reason', e)})"
    looked = ", ".join(str(d / info["folder"]) for d in dirs)
    raise UsageError(
        f"{name} not found (looked in {looked}{err}); pass --data-dir to a folder holding torchvision's "
        f"'{info['folder']}' or run once where the network is reachable"
    )
