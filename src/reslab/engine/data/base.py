"""What every dataset format shares: the in-memory :class:`ArrayDataset`, where a dataset's
files are looked for and downloaded to (the downloads themselves are :mod:`.download`), and
the checks and statistics of the arrays read."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchvision.datasets.utils import calculate_md5

from reslab.errors import UsageError

#: Names accepted by :func:`load_arrays` (``folder:PATH`` goes through :func:`open_dataset`).
#: where Debian's dataset-fashion-mnist puts the files
SYSTEM_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "digits")


@dataclass
class ArrayDataset:
    """A whole dataset in memory.

    ``train_x``/``test_x`` are uint8 ``N x C x H x W``; ``train_y``/``test_y`` int64;
    ``mean``/``std`` are per channel in ``[0, 1]`` units (computed on the training set);
    ``flip`` says whether a horizontal flip keeps the label (true for clothes and
    natural images, false for digits); ``crop_padding`` is the pad of the random crop
    that suits the image size.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool = True
    crop_padding: int = 4

    @property
    def input_size(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)

    def __post_init__(self) -> None:
        for n in ("train_x", "test_x"):
            t = getattr(self, n)
            if t.dtype != torch.uint8 or t.ndim != 4:
                raise ValueError(f"{n} must be a uint8 N x C x H x W tensor, got {t.dtype} {tuple(t.shape)}")
        if len(self.train_x) != len(self.train_y) or len(self.test_x) != len(self.test_y):
            raise ValueError("images and labels differ in length")


def search_dirs(name: str, data_dir: str | Path | None = None) -> list[Path]:
    """The folders where ``name`` is looked for, in order: ``data_dir`` alone when given."""
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    dirs: list[Path] = []
    env = os.environ.get("RESLAB_DATA")
    if env:
        dirs.append(Path(env).expanduser() / name)
    dirs.append(cache_dir() / name)
    if name == "fashion-mnist":
        dirs.append(SYSTEM_FASHION_DIR)
    return dirs


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "reslab"


def given_dir_error(name: str, folder: Path, wanted: str) -> UsageError:
    """The error for a ``--data-dir`` that does not hold ``name``."""
    what = "does not exist" if not folder.exists() else ("is not a folder" if not folder.is_dir() else "")
    if not what:
        what = f"holds no {name} (looked for {wanted})"
    return UsageError(
        f"--data-dir {folder} {what}; pass the folder that holds {name}'s files, "
        "or leave --data-dir out to use the default places (see 'reslab train --help')"
    )


def check_labels(train_y: Tensor, test_y: Tensor, num_classes: int, name: str) -> None:
    for y in (train_y, test_y):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise UsageError(
                f"{name} labels fall outside 0..{num_classes - 1}; the files are corrupt, fetch them again"
            )


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (float64 accumulation)."""
    c = x.shape[1]
    flat = x.transpose(0, 1).reshape(c, -1)
    mean = torch.zeros(c, dtype=torch.float64)
    sq = torch.zeros(c, dtype=torch.float64)
    # chunks keep the float64 copy small for cifar-sized arrays
    step = 1 << 24
    for i in range(0, flat.shape[1], step):
        part = flat[:, i : i + step].to(torch.float64) / 255.0
        mean += part.sum(1)
        sq += (part * part).sum(1)
    n = max(flat.shape[1], 1)
    mean /= n
    var = (sq / n - mean * mean).clamp_min(1e-12)
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in var.sqrt())


#: the MD5 of a file, as torchvision computes it for its own datasets
md5_of = calculate_md5
