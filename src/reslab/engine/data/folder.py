"""Image folders (``folder:PATH``, torchvision's ImageFolder layout ``train/CLASS/*.png``),
streamed through a DataLoader as uint8 batches."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from reslab.engine.data.base import channel_stats
from reslab.errors import UsageError


@dataclass
class FolderDataset:
    """An ImageFolder tree streamed through a DataLoader: ``PATH/train/CLASS/*`` and
    ``PATH/test/CLASS/*`` (``val`` is accepted for ``test``).

    Images are decoded by workers, resized to ``image_size`` and handed to the engine as
    uint8 batches, which it augments on the device like the in-memory datasets.
    """

    name: str
    root: Path
    train_files: list[tuple[str, int]]
    test_files: list[tuple[str, int]]
    classes: tuple[str, ...]
    image_size: tuple[int, int]
    channels: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    flip: bool = True
    crop_padding: int = 4
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return self.channels, self.image_size[0], self.image_size[1]

    def loader(
        self, files: list[tuple[str, int]], batch_size: int, order: Tensor | None, workers: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """uint8 image batches and labels of ``files`` in ``order`` (all, in order, if None)."""
        from torch.utils.data import DataLoader

        ds = _FolderImages(files, self.image_size, self.channels)
        sampler = order.tolist() if order is not None else None
        dl = DataLoader(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=False,
            collate_fn=_collate_uint8,
        )
        yield from dl


class _FolderImages(torch.utils.data.Dataset):
    def __init__(self, files: list[tuple[str, int]], size: tuple[int, int], channels: int) -> None:
        self.files = files
        self.size = size
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        from PIL import Image

        path, label = self.files[i]
        try:
            with Image.open(path) as im:
                im = im.convert(self.mode)
                if im.size != (self.size[1], self.size[0]):
                    im = im.resize((self.size[1], self.size[0]), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except OSError as e:
            raise UsageError(f"cannot read image {path} ({e}); remove or replace the file") from None
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), label


def _collate_uint8(batch: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.int64)


_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def _scan(split_dir: Path, classes: tuple[str, ...] | None) -> tuple[list[tuple[str, int]], tuple[str, ...]]:
    found = tuple(sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if classes is None:
        classes = found
    elif set(found) - set(classes):
        raise UsageError(
            f"{split_dir} has classes {sorted(set(found) - set(classes))} that the train folder lacks; "
            "give both splits the same class folders"
        )
    files: list[tuple[str, int]] = []
    for i, c in enumerate(classes):
        d = split_dir / c
        if not d.is_dir():
            continue
        for root, _, names in sorted(os.walk(d)):
            for n in sorted(names):
                if Path(n).suffix.lower() in _IMAGE_EXT:
                    files.append((str(Path(root) / n), i))
    return files, classes


def load_folder(path: str | Path, image_size: int | None = None, flip: bool = True) -> FolderDataset:
    """An ImageFolder tree ``PATH/{train,test|val}/CLASS/IMAGE`` for streaming."""
    from PIL import Image

    root = Path(path).expanduser()
    if not (root / "train").is_dir():
        raise UsageError(
            f"folder dataset {root} has no 'train' sub-folder; lay it out as {root}/train/CLASS/*.png "
            f"and {root}/test/CLASS/*.png"
        )
    test_dir = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    if test_dir is None:
        raise UsageError(f"folder dataset {root} has no 'test' (or 'val') sub-folder; add one with the same classes")
    train_files, classes = _scan(root / "train", None)
    if len(classes) < 2 or not train_files:
        raise UsageError(f"{root}/train needs at least two class folders with images, found {len(classes)}")
    test_files, _ = _scan(test_dir, classes)
    if not test_files:
        raise UsageError(f"{test_dir} holds no images; add some in its class folders")
    with Image.open(train_files[0][0]) as im:
        channels = 1 if im.mode in ("L", "1", "I", "I;16", "F") else 3
        size = (im.height, im.width) if image_size is None else (image_size, image_size)
    ds = FolderDataset(f"folder:{root}", root, train_files, test_files, classes, size, channels, flip=flip)
    ds.crop_padding = max(1, round(min(size) / 8))
    # statistics from an evenly spread sample: decoding every image just for these is wasteful
    sample_idx = np.linspace(0, len(train_files) - 1, num=min(512, len(train_files))).round().astype(int)
    sample = _FolderImages([train_files[i] for i in sample_idx], size, channels)
    ds.mean, ds.std = channel_stats(torch.stack([sample[i][0] for i in range(len(sample))]))
    return ds
