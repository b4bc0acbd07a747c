"""CIFAR batches in torchvision's on-disk format (``cifar-10-batches-py``), made up here:
CIFAR cannot be downloaded on the test machines, and the format is what reslab reads."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from reslab.engine import data


def write_cifar(
    root: Path, name: str, n_train: int = 20, n_test: int = 10, learnable: bool = False
) -> dict[str, np.ndarray]:
    """Random images and labels in ``root/<folder>``, ``n_train`` per training batch file and
    ``n_test`` in the test file; returns what was written, split by split. ``learnable``:
    each image's brightness says its class, so a short run learns above chance."""
    info = data.CIFAR[name]
    base = root / info["folder"]
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    k = info["num_classes"]
    out: dict[str, list] = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for fname, _ in info[split]:
            y = rng.integers(0, k, n).tolist()
            if learnable:
                noise = rng.integers(0, 32, (n, 3072))
                x = (noise + (np.asarray(y)[:, None] * 224) // max(k - 1, 1)).astype(np.uint8)
            else:
                x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            with open(base / fname, "wb") as f:
                pickle.dump({"data": x, info["label_key"]: y, "batch_label": fname}, f)
            out[f"{split}_x"].append(x)
            out[f"{split}_y"].append(y)
    meta_name, key, _ = info["meta"]
    with open(base / meta_name, "wb") as f:
        pickle.dump({key: [f"class{i}" for i in range(k)]}, f)
    return {k2: np.concatenate(v) for k2, v in out.items()}


def as_official(root: Path, name: str) -> dict:
    """The CIFAR table entry for ``name`` with the checksums of the files written under
    ``root``, so that they pass as the official ones (for ``monkeypatch.setitem``)."""
    from reslab.engine.data.base import md5_of

    info = dict(data.CIFAR[name])
    base = root / info["folder"]
    for split in ("train", "test"):
        info[split] = [(f, md5_of(base / f)) for f, _ in info[split]]
    meta, key, _ = info["meta"]
    info["meta"] = (meta, key, md5_of(base / meta))
    return info
