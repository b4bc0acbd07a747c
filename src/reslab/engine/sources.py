"""Where a run's batches come from, the same way for in-memory arrays and image folders.

In-memory datasets live on the training device as one uint8 tensor; each epoch draws a
permutation and the augmentation (random crop as a translation with zero fill, and
horizontal flip) from a generator seeded by ``(seed, epoch)``, and applies both to whole
batches with one gather. Nothing in the hot loop runs per image in Python. The
train/validation split and ``train_subset`` use a fixed seed, so runs with different seeds
are compared on the same validation images.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from reslab.engine.config import TrainConfig
from reslab.engine.data import ArrayDataset, FolderDataset
from reslab.engine.distributed import Dist
from reslab.errors import UsageError

#: validation images held out for these datasets; others hold out 10%
DEFAULT_VAL_SIZE = {"fashion-mnist": 5000, "cifar10": 5000, "cifar100": 5000}


#: the train/validation split and ``train_subset`` use this fixed seed, so runs with
#: different seeds are compared on the same validation images
SPLIT_SEED = 0


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integers, well mixed (neighbouring epochs get unrelated streams)."""
    h = hashlib.sha256(",".join(str(int(k)) for k in keys).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def augment_gather(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, pad: int, channels_last: bool) -> Tensor:
    """Random-crop (a shift by ``dy``, ``dx`` in ``[-pad, pad]`` with zero fill, i.e.
    pad-and-crop) and horizontal flip of a uint8 batch, in one gather.

    Output pixel ``(i, j)`` of image ``b`` is input pixel ``(i + dy, j' + dx)`` with
    ``j' = W - 1 - j`` where flipped, else ``j``, or 0 outside the image.
    """
    b, _, h, w = x.shape
    dev = x.device
    if pad > 0:
        x = F.pad(x, (pad, pad, pad, pad))
    rows = torch.arange(h, device=dev).unsqueeze(0) + (dy + pad).unsqueeze(1)  # B x H
    cols = torch.arange(w, device=dev).unsqueeze(0)
    cols = torch.where(flip.unsqueeze(1), (w - 1) - cols, cols) + (dx + pad).unsqueeze(1)  # B x W
    bi = torch.arange(b, device=dev).view(b, 1, 1)
    # advanced indices around a slice put the batch/row/col dims first: B x H x W x C,
    # which viewed as NCHW is channels_last memory already
    out = x[bi, :, rows.unsqueeze(2), cols.unsqueeze(1)].permute(0, 3, 1, 2)
    return out if channels_last else out.contiguous()


class ArraySource:
    def __init__(self, ds: ArrayDataset, cfg: TrainConfig, device: torch.device, d: Dist) -> None:
        n = len(ds.train_x)
        split = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
        val_size = cfg.val_size or 0
        if val_size >= n:
            raise UsageError(f"val_size {val_size} leaves no training images ({n} in all); pass a smaller --val-size")
        val_idx, train_idx = split[:val_size], split[val_size:]
        if cfg.train_subset is not None:
            train_idx = train_idx[: cfg.train_subset]
        self.device = device
        self.d = d
        self.train_x = ds.train_x[train_idx].to(device)
        self.train_y = ds.train_y[train_idx].to(device)
        if val_size:
            self.val = (ds.train_x[val_idx].to(device), ds.train_y[val_idx].to(device))
        else:
            self.val = (ds.test_x.to(device), ds.test_y.to(device))
        test_idx = test_subset(len(ds.test_x), cfg.test_subset)
        self.test = (ds.test_x[test_idx].to(device), ds.test_y[test_idx].to(device))
        #: the validation images are the test images, in the same order (then the last validation is the test)
        self.val_is_test = not val_size and len(test_idx) == len(ds.test_x)
        self.n_train = len(train_idx)
        self.chance_acc = chance_acc(ds.test_y[test_idx].tolist())

    def train_batches(
        self, order: Tensor, aug: tuple[Tensor, Tensor, Tensor], batch: int, steps: int, start: int = 0
    ) -> Iterator[tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]]:
        local = batch // self.d.world
        for s in range(start, steps):
            lo = s * batch + self.d.rank * local
            idx = order[lo : lo + local]
            dev_idx = idx.to(self.device, non_blocking=True)
            a = tuple(t[lo : lo + local].to(self.device, non_blocking=True) for t in aug)
            yield self.train_x[dev_idx], self.train_y[dev_idx], a  # type: ignore[misc]

    def eval_batches(self, which: str, batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = self.val if which == "val" else self.test
        # ranks take interleaved shards; sums are reduced across ranks afterwards
        for i in range(self.d.rank * batch, len(x), batch * self.d.world):
            yield x[i : i + batch], y[i : i + batch]


class FolderSource:
    def __init__(self, ds: FolderDataset, cfg: TrainConfig, device: torch.device, d: Dist) -> None:
        n = len(ds.train_files)
        split = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
        val_size = cfg.val_size or 0
        if val_size >= n:
            raise UsageError(f"val_size {val_size} leaves no training images ({n} in all); pass a smaller --val-size")
        files = ds.train_files
        val = [files[i] for i in split[:val_size]]
        train = [files[i] for i in split[val_size:]]
        if cfg.train_subset is not None:
            train = train[: cfg.train_subset]
        self.ds, self.device, self.d, self.workers = ds, device, d, cfg.workers
        self.train_files = train
        self.val_files = val if val_size else ds.test_files
        self.test_files = [ds.test_files[i] for i in test_subset(len(ds.test_files), cfg.test_subset).tolist()]
        #: the validation images are the test images, in the same order (then the last validation is the test)
        self.val_is_test = not val_size and len(self.test_files) == len(ds.test_files)
        self.n_train = len(train)
        self.chance_acc = chance_acc([label for _, label in self.test_files])

    def train_batches(
        self, order: Tensor, aug: tuple[Tensor, Tensor, Tensor], batch: int, steps: int, start: int = 0
    ) -> Iterator[tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]]:
        local = batch // self.d.world
        pos = torch.cat(
            [
                torch.arange(s * batch + self.d.rank * local, s * batch + (self.d.rank + 1) * local)
                for s in range(start, steps)
            ]
        )
        loader = self.ds.loader(self.train_files, local, order[pos], self.workers)
        for k, (x, y) in enumerate(loader):
            p = pos[k * local : (k + 1) * local]
            yield (
                x.to(self.device, non_blocking=True),
                y.to(self.device, non_blocking=True),
                tuple(t[p].to(self.device) for t in aug),  # type: ignore[misc]
            )

    def eval_batches(self, which: str, batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        files = self.val_files if which == "val" else self.test_files
        mine = files[self.d.rank :: self.d.world]
        for x, y in self.ds.loader(mine, batch, None, self.workers):
            yield x.to(self.device), y.to(self.device)


def test_subset(n: int, subset: int | None) -> Tensor:
    """Indices of the test images used: all, or the first ``subset`` of a fixed shuffle (the same
    images for every run, seed and technique, so test accuracies stay paired)."""
    if subset is None or subset >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))[:subset].sort().values


def chance_acc(labels: list[int]) -> float:
    """Test accuracy of a constant prediction of the most frequent class: what a run that
    lost its weights (diverged) is worth; comparisons count a diverged run at this level."""
    if not labels:
        return 0.0
    return Counter(labels).most_common(1)[0][1] / len(labels)


def epoch_draws(cfg: TrainConfig, epoch: int, n: int) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """The epoch's data order and augmentation (crop offsets, flips), all from ``(seed, epoch)``."""
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, 1))
    order = torch.randperm(n, generator=g)
    pad = cfg.crop_padding or 0
    dy = torch.randint(-pad, pad + 1, (n,), generator=g)
    dx = torch.randint(-pad, pad + 1, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5 if cfg.flip else torch.zeros(n, dtype=torch.bool)
    return order, (dy, dx, flip)
