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
checked; offline, the error names the places looked and the fixes.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

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

#: Names accepted by :func:`load_arrays` (``folder:PATH`` goes through :func:`open_dataset`).
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "digits")

FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# The official files. The sha256 is of the *decompressed* content: Debian's package
# re-compresses the .gz files (so their bytes differ from the upstream .gz) while the IDX
# content is identical, and a content checksum verifies both. The md5 is upstream's .gz,
# checked on download.
FASHION_FILES: dict[str, tuple[str, str, int]] = {
    # key: (file stem, sha256 of the decompressed IDX, expected item count)
    "train_x": (
        "train-images-idx3-ubyte",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        60000,
    ),
    "train_y": (
        "train-labels-idx1-ubyte",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        60000,
    ),
    "test_x": (
        "t10k-images-idx3-ubyte",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        10000,
    ),
    "test_y": (
        "t10k-labels-idx1-ubyte",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        10000,
    ),
}
FASHION_URLS = (
    "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)
FASHION_GZ_MD5 = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
SYSTEM_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

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


# ---------------------------------------------------------------------------------------
# Locations


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


def _download(url: str, dest: Path, md5: str) -> None:
    """Fetch ``url`` to ``dest`` through a temporary file, checking its md5."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    h = hashlib.md5()
    with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
        while chunk := r.read(1 << 20):
            h.update(chunk)
            f.write(chunk)
    if h.hexdigest() != md5:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"download of {url} has md5 {h.hexdigest()}, expected {md5}; try again later")
    os.replace(tmp, dest)


# ---------------------------------------------------------------------------------------
# IDX (fashion-mnist)

_IDX_DTYPES = {0x08: np.uint8}


def parse_idx(data: bytes, source: str = "?", expected_dims: int | None = None) -> np.ndarray:
    """Parse an IDX file's bytes (uint8 payload), validating magic, dimensions and length."""
    if len(data) < 4:
        raise UsageError(f"{source} is not an IDX file (only {len(data)} bytes); delete it and fetch it again")
    zero, dtype, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or dtype not in _IDX_DTYPES or not 1 <= ndim <= 4:
        raise UsageError(
            f"{source} has a bad IDX magic number 0x{data[:4].hex()} (expected 0x0000080N): "
            "it is not an uint8 IDX file; delete it and fetch it again"
        )
    if expected_dims is not None and ndim != expected_dims:
        raise UsageError(f"{source} has {ndim} dimensions, expected {expected_dims}; delete it and fetch it again")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UsageError(f"{source} is truncated inside its header; delete it and fetch it again")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise UsageError(
            f"{source} is {what}: {len(data)} bytes, its header {dims} needs {expected}; delete it and fetch it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _read_idx_file(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UsageError(f"{path} is corrupt or truncated ({e}); delete it and fetch it again") from None


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    return None


def _fashion_from(folder: Path, verify: bool) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    # smallest files first: a broken download is reported without decoding 47 MB first
    for key, (stem, sha, count) in sorted(FASHION_FILES.items(), key=lambda kv: (kv[0].endswith("_x"), kv[1][2])):
        path = _find_idx(folder, stem)
        if path is None:
            raise FileNotFoundError(stem)
        data = _read_idx_file(path)
        arr = parse_idx(data, str(path), expected_dims=3 if key.endswith("_x") else 1)
        if arr.shape[0] != count or (key.endswith("_x") and arr.shape[1:] != (28, 28)):
            raise UsageError(
                f"{path} holds {tuple(arr.shape)}, fashion-mnist's has {count} items of 28x28; "
                "delete it and fetch it again"
            )
        if verify and hashlib.sha256(data).hexdigest() != sha:
            raise UsageError(
                f"{path} fails its checksum (not the official fashion-mnist file); delete it and fetch it again"
            )
        out[key] = arr
    return out


def _given_dir_error(name: str, folder: Path, wanted: str) -> UsageError:
    """The error for a ``--data-dir`` that does not hold ``name``."""
    what = "does not exist" if not folder.exists() else ("is not a folder" if not folder.is_dir() else "")
    if not what:
        what = f"holds no {name} (looked for {wanted})"
    return UsageError(
        f"--data-dir {folder} {what}; pass the folder that holds {name}'s files, "
        "or leave --data-dir out to use the default places (see 'reslab train --help')"
    )


def _load_fashion(data_dir: str | Path | None, download: bool, verify: bool) -> ArrayDataset:
    dirs = search_dirs("fashion-mnist", data_dir)
    arrays = None
    for d in dirs:
        if all(_find_idx(d, stem) for stem, _, _ in FASHION_FILES.values()):
            arrays = _fashion_from(d, verify)
            break
    if arrays is None and data_dir is not None:
        missing = [stem for stem, _, _ in FASHION_FILES.values() if not _find_idx(dirs[0], stem)]
        raise _given_dir_error("fashion-mnist", dirs[0], ", ".join(f"{m}[.gz]" for m in missing))
    if arrays is None:
        target = cache_dir() / "fashion-mnist"
        errors = []
        if download:
            for base in FASHION_URLS:
                try:
                    for stem, md5 in FASHION_GZ_MD5.items():
                        if not (target / f"{stem}.gz").is_file():
                            _download(base + f"{stem}.gz", target / f"{stem}.gz", md5)
                    arrays = _fashion_from(target, verify)
                    break
                except (urllib.error.URLError, OSError, TimeoutError) as e:
                    errors.append(f"{base}: {getattr(e, 'reason', e)}")
        if arrays is None:
            looked = ", ".join(str(d) for d in dirs)
            why = f"; download failed ({errors[0]})" if errors else ""
            raise UsageError(
                f"fashion-mnist not found (looked in {looked}{why}); install it with "
                "'apt-get install dataset-fashion-mnist' or pass --data-dir to a folder with the four IDX files"
            )
    train_x = torch.from_numpy(arrays["train_x"].copy()).unsqueeze(1)
    test_x = torch.from_numpy(arrays["test_x"].copy()).unsqueeze(1)
    train_y = torch.from_numpy(arrays["train_y"].astype(np.int64))
    test_y = torch.from_numpy(arrays["test_y"].astype(np.int64))
    _check_labels(train_y, test_y, 10, "fashion-mnist")
    mean, std = channel_stats(train_x)
    # garments fill most of the 28x28 frame; a 2-pixel shift keeps them whole while still varying position
    return ArrayDataset("fashion-mnist", train_x, train_y, test_x, test_y, 10, FASHION_CLASSES, mean, std, True, 2)


def _check_labels(train_y: Tensor, test_y: Tensor, num_classes: int, name: str) -> None:
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


# ---------------------------------------------------------------------------------------
# CIFAR (torchvision's python-pickle batches)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


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
            if _md5(base / f) != md5:
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
    _check_labels(parts["train"][1], parts["test"][1], n, info["folder"])
    # The published statistics of the official sets; recomputed for other (e.g. test) files.
    mean, std = (info["mean"], info["std"]) if verify else channel_stats(parts["train"][0])
    return ArrayDataset(
        "cifar10" if n == 10 else "cifar100", *parts["train"], *parts["test"], n, classes, mean, std, True, 4
    )


def _load_cifar(name: str, data_dir: str | Path | None, download: bool, verify: bool) -> ArrayDataset:
    info = CIFAR[name]
    dirs = search_dirs(name, data_dir)
    for d in dirs:
        ds = _cifar_from(d, info, verify)
        if ds is not None:
            return ds
    if data_dir is not None:
        raise _given_dir_error(name, dirs[0], f"{info['folder']}/ in torchvision's format")
    target = cache_dir() / name
    err = ""
    if download:
        archive = target / Path(info["url"]).name
        try:
            if not archive.is_file():
                _download(info["url"], archive, info["tgz_md5"])
            with tarfile.open(archive, "r:gz") as tf:
                tf.extractall(target, filter="data")
            ds = _cifar_from(target, info, verify)
            if ds is not None:
                return ds
        except (urllib.error.URLError, OSError, TimeoutError, tarfile.TarError) as e:
            err = f"; download failed ({getattr(e, 'reason', e)})"
    looked = ", ".join(str(d / info["folder"]) for d in dirs)
    raise UsageError(
        f"{name} not found (looked in {looked}{err}); pass --data-dir to a folder holding torchvision's "
        f"'{info['folder']}' or run once where the network is reachable"
    )


# ---------------------------------------------------------------------------------------
# digits (scikit-learn)


def _load_digits() -> ArrayDataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError(
            "the digits dataset needs scikit-learn; install it with pip install 'reslab[digits]'"
        ) from None
    d = load_digits()
    # 0..16 grey levels -> 0..255; a fixed split (every 5th image is test), not seed dependent
    x = torch.from_numpy(np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    test = torch.arange(len(y)) % 5 == 0
    train_x, train_y, test_x, test_y = x[~test], y[~test], x[test], y[test]
    mean, std = channel_stats(train_x)
    classes = tuple(str(i) for i in range(10))
    # digits are not mirror symmetric; 8x8 images take a 1-pixel jitter at most
    return ArrayDataset("digits", train_x, train_y, test_x, test_y, 10, classes, mean, std, False, 1)


# ---------------------------------------------------------------------------------------
# folder:PATH


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


# ---------------------------------------------------------------------------------------
# Entry points

# Decoding and checksumming fashion-mnist takes seconds; a comparison trains many runs in
# one process, so the last dataset loaded is kept (tensors are never modified in place).
_CACHE: dict[tuple[Any, ...], ArrayDataset] = {}


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
        if key not in _CACHE:
            loader = _load_fashion if name == "fashion-mnist" else lambda *a: _load_cifar(name, *a)
            _CACHE.clear()  # one dataset at a time: a sweep over datasets should not pile them up
            _CACHE[key] = loader(data_dir, download, verify)
        return dataclasses.replace(_CACHE[key])
    if name == "digits":
        return _load_digits()
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
