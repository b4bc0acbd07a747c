"""Fashion-MNIST: the four IDX files (gzipped or not), from Debian's package, a folder, the
cache, or the official download."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import torch

from reslab.engine.data.base import (
    ArrayDataset,
    cache_dir,
    channel_stats,
    check_labels,
    given_dir_error,
    search_dirs,
)
from reslab.engine.data.download import fetch_file
from reslab.errors import UsageError

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


FASHION_GZ_MD5 = {
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}

FASHION_URLS = (
    "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
)


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


def load_fashion(data_dir: str | Path | None, download: bool, verify: bool) -> ArrayDataset:
    dirs = search_dirs("fashion-mnist", data_dir)
    arrays = None
    for d in dirs:
        if all(_find_idx(d, stem) for stem, _, _ in FASHION_FILES.values()):
            arrays = _fashion_from(d, verify)
            break
    if arrays is None and data_dir is not None:
        missing = [stem for stem, _, _ in FASHION_FILES.values() if not _find_idx(dirs[0], stem)]
        raise given_dir_error("fashion-mnist", dirs[0], ", ".join(f"{m}[.gz]" for m in missing))
    if arrays is None:
        target = cache_dir() / "fashion-mnist"
        errors = []
        if download:
            for base in FASHION_URLS:
                try:
                    for stem, md5 in FASHION_GZ_MD5.items():
                        fetch_file(base + f"{stem}.gz", target / f"{stem}.gz", md5)
                    arrays = _fashion_from(target, verify)
                    break
                except OSError as e:  # URLError and socket errors are OSErrors
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
    check_labels(train_y, test_y, 10, "fashion-mnist")
    mean, std = channel_stats(train_x)
    # garments fill most of the 28x28 frame; a 2-pixel shift keeps them whole while still varying position
    return ArrayDataset("fashion-mnist", train_x, train_y, test_x, test_y, 10, FASHION_CLASSES, mean, std, True, 2)
