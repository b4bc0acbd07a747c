"""Datasets: the real fashion-mnist files, corrupt files, search order, CIFAR and folder
trees generated here in their real on-disk formats, checked against torchvision."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from cifar_files import write_cifar
from reslab import caches
from reslab.engine import data
from reslab.engine.data import base as data_base
from reslab.engine.data import load_arrays, load_folder, parse_idx
from reslab.errors import UsageError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="apt-get install dataset-fashion-mnist"
)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No cache, no $RESLAB_DATA, no system copy, no network: only what a test provides."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("RESLAB_DATA", raising=False)
    monkeypatch.setattr(data_base, "SYSTEM_FASHION_DIR", tmp_path / "no-system-copy")

    def offline(*a, **k):
        raise urllib.error.URLError("network unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    caches.clear("datasets.decoded")
    yield tmp_path
    caches.clear("datasets.decoded")


def _copy_fashion(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in FASHION_DIR.glob("*.gz"):
        shutil.copy(f, dest / f.name)
    return dest


# ---------------------------------------------------------------------------------------
# fashion-mnist


@needs_fashion
def test_fashion_mnist_real_files_against_torchvision(tmp_path):
    ds = load_arrays("fashion-mnist", FASHION_DIR)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert ds.num_classes == 10 and len(ds.classes) == 10
    # torchvision's own reader of the same files is the independent reference
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in FASHION_DIR.glob("*.gz"):
        with gzip.open(f) as src:
            (raw / f.name[:-3]).write_bytes(src.read())
    tv = torchvision.datasets.FashionMNIST(str(tmp_path), train=False, download=False)
    assert torch.equal(tv.data, ds.test_x[:, 0]) and torch.equal(tv.targets, ds.test_y)
    assert list(ds.classes) == [c.replace("T-shirt/top", "T-shirt/top") for c in tv.classes]
    # the widely published statistics of the training set: mean 0.2860, std 0.3530
    assert ds.mean[0] == pytest.approx(0.2860, abs=5e-4) and ds.std[0] == pytest.approx(0.3530, abs=5e-4)


def test_parse_idx_reads_a_hand_made_file():
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    blob = struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">III", 2, 3, 4) + arr.tobytes()
    assert np.array_equal(parse_idx(blob), arr)
    with pytest.raises(UsageError, match="truncated"):
        parse_idx(blob[:-1], "x")
    with pytest.raises(UsageError, match="longer"):
        parse_idx(blob + b"\0", "x")
    with pytest.raises(UsageError, match="magic"):
        parse_idx(b"\x00\x00\x0d\x03" + blob[4:], "x")  # 0x0d = float32, not uint8
    with pytest.raises(UsageError, match="dimensions"):
        parse_idx(blob, "x", expected_dims=1)


@needs_fashion
@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate_gz", "corrupt or truncated"),
        ("truncate_idx", "truncated"),
        ("flip_byte", "checksum"),
        ("bad_magic", "magic"),
        ("not_gzip", "corrupt or truncated"),
    ],
)
def test_corrupt_fashion_files_give_one_clear_error(isolated, damage, message):
    d = _copy_fashion(isolated / "fm")
    target = d / "t10k-labels-idx1-ubyte.gz"  # small, so the test stays fast
    raw = gzip.decompress(target.read_bytes())
    if damage == "truncate_gz":
        blob = target.read_bytes()
        target.write_bytes(blob[: len(blob) // 2])
    elif damage == "truncate_idx":
        target.write_bytes(gzip.compress(raw[:-100]))
    elif damage == "flip_byte":
        b = bytearray(raw)
        b[5000] = (b[5000] + 1) % 10  # still a valid label: only the checksum can tell
        target.write_bytes(gzip.compress(bytes(b)))
    elif damage == "bad_magic":
        target.write_bytes(gzip.compress(b"\x00\x00\x0c\x01" + raw[4:]))
    elif damage == "not_gzip":
        target.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(UsageError, match=message) as e:
        load_arrays("fashion-mnist", d)
    assert "t10k-labels" in str(e.value) and "\n" not in str(e.value)


def test_missing_fashion_names_places_and_fixes(isolated, monkeypatch):
    monkeypatch.setenv("RESLAB_DATA", str(isolated / "env"))
    with pytest.raises(UsageError) as e:
        load_arrays("fashion-mnist")
    msg = str(e.value)
    for place in (isolated / "env" / "fashion-mnist", isolated / "cache" / "reslab" / "fashion-mnist"):
        assert str(place) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg and "download failed" in msg


@needs_fashion
def test_search_order_without_data_dir(isolated, monkeypatch):
    env = isolated / "env"
    _copy_fashion(env / "fashion-mnist")
    monkeypatch.setenv("RESLAB_DATA", str(env))
    assert data.search_dirs("fashion-mnist")[:2] == [
        env / "fashion-mnist",
        isolated / "cache" / "reslab" / "fashion-mnist",
    ]
    ds = load_arrays("fashion-mnist")  # found through $RESLAB_DATA (nothing else exists)
    assert len(ds.train_x) == 60000
    # a broken copy in --data-dir is the only one looked at, so it is the one reported
    broken = isolated / "given"
    broken.mkdir()
    for f in FASHION_DIR.glob("*.gz"):
        (broken / f.name).write_bytes(b"junk")
    with pytest.raises(UsageError, match=str(broken)):
        load_arrays("fashion-mnist", broken)


@needs_fashion
@pytest.mark.parametrize("kind", ["missing", "empty", "partial", "file"])
def test_data_dir_without_the_dataset_is_an_error_not_a_fallback(isolated, monkeypatch, kind):
    # a good copy elsewhere must not be used in place of the folder the user named
    monkeypatch.setattr(data_base, "SYSTEM_FASHION_DIR", FASHION_DIR)
    given = isolated / "given"
    if kind == "empty":
        given.mkdir()
    elif kind == "partial":
        _copy_fashion(given)
        (given / "t10k-labels-idx1-ubyte.gz").unlink()
    elif kind == "file":
        given.write_text("not a folder")
    assert data.search_dirs("fashion-mnist", given) == [given]
    with pytest.raises(UsageError) as e:
        load_arrays("fashion-mnist", given)
    msg = str(e.value)
    assert msg.startswith(f"--data-dir {given} ") and "\n" not in msg
    expected = {"missing": "does not exist", "empty": "train-images-idx3-ubyte", "file": "is not a folder"}
    expected["partial"] = "t10k-labels-idx1-ubyte[.gz])"
    assert expected[kind] in msg
    if kind == "partial":
        assert "train-images" not in msg  # only what is missing is named


# ---------------------------------------------------------------------------------------
# CIFAR in torchvision's format


@pytest.mark.parametrize("name, tv_class", [("cifar10", "CIFAR10"), ("cifar100", "CIFAR100")])
def test_cifar_format_matches_torchvision(isolated, monkeypatch, name, tv_class):
    root = isolated / "c"
    written = write_cifar(root, name)
    ds = load_arrays(name, root, verify=False)
    cls = getattr(torchvision.datasets, tv_class)
    # the files are ours, so torchvision's md5 check must be bypassed to read them
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    for train, x, y in ((True, ds.train_x, ds.train_y), (False, ds.test_x, ds.test_y)):
        tv = cls(str(root), train=train, download=False)
        assert torch.equal(x.permute(0, 2, 3, 1), torch.from_numpy(tv.data))  # torchvision keeps HWC
        assert y.tolist() == list(tv.targets)
        assert list(ds.classes) == list(tv.classes)
    assert len(ds.train_x) == len(written["train_x"]) and ds.num_classes == (10 if name == "cifar10" else 100)


def test_cifar_checksums_and_unsafe_pickles(isolated):
    root = isolated / "c"
    write_cifar(root, "cifar10")
    with pytest.raises(UsageError, match="checksum"):
        load_arrays("cifar10", root)  # hand-made files are not the official ones
    # a pickle that would run code when loaded must be refused, not executed
    marker = isolated / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(root / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"data": Evil()}, f)
    with pytest.raises(UsageError, match="data_batch_3"):
        load_arrays("cifar10", root, verify=False)
    assert not marker.exists()


def test_cifar_missing_offline(isolated):
    with pytest.raises(UsageError, match=r"cifar-10-batches-py.*download failed.*--data-dir"):
        load_arrays("cifar10")
    with pytest.raises(UsageError, match=r"--data-dir .*nothing does not exist"):
        load_arrays("cifar10", isolated / "nothing")
    (isolated / "empty").mkdir()
    with pytest.raises(UsageError, match=r"holds no cifar10 \(looked for cifar-10-batches-py/"):
        load_arrays("cifar10", isolated / "empty")


# ---------------------------------------------------------------------------------------
# digits and folders


def test_digits_scaled_from_sklearn():
    from sklearn.datasets import load_digits

    ds = load_arrays("digits")
    ref = load_digits()
    assert len(ds.train_x) + len(ds.test_x) == len(ref.target)
    # every 5th image is the test split; grey levels 0..16 map to 0..255
    assert torch.equal(ds.test_x[:, 0].to(torch.float64), torch.from_numpy(np.rint(ref.images[::5] * 255 / 16)))
    assert ds.test_y.tolist() == ref.target[::5].tolist()
    assert ds.flip is False


def _write_folder(root: Path, classes: tuple[str, ...], per_class: int, size: tuple[int, int] = (12, 10)):
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / c / f"{i}.png")


def test_folder_dataset_matches_imagefolder(tmp_path):
    _write_folder(tmp_path, ("cat", "dog", "emu"), 4)
    ds = load_folder(tmp_path)
    assert ds.classes == ("cat", "dog", "emu") and ds.input_size == (3, 12, 10)
    ref = torchvision.datasets.ImageFolder(str(tmp_path / "train"))
    assert [(Path(p).name, y) for p, y in ds.train_files] == [(Path(p).name, y) for p, y in ref.samples]
    x, y = next(iter(ds.loader(ds.train_files, 5, None, 0)))
    assert x.dtype == torch.uint8 and x.shape == (5, 3, 12, 10)
    img, label = ref[0]
    assert torch.equal(x[0], torch.from_numpy(np.array(img)).permute(2, 0, 1)) and y[0] == label


def test_folder_layout_errors(tmp_path):
    (tmp_path / "cat").mkdir()
    with pytest.raises(UsageError, match="train"):
        load_folder(tmp_path)
    with pytest.raises(UsageError, match="unknown dataset"):
        load_arrays("mnist-ish")


def test_one_normalisation_for_uint8_and_unit_inputs():
    """Training's uint8 path and inference's [0, 1] path are one rule, (p - mean) / std,
    checked against that rule written out in float64."""
    from reslab.nn.normalize import Normalize

    x = torch.arange(256, dtype=torch.uint8).repeat(2, 3, 1).view(2, 3, 16, 16)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    want = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64
    ).view(1, 3, 1, 1)
    norm = Normalize(mean, std)
    for got in (norm.from_uint8(x), norm.from_uint8(x, channels_last=True), norm.from_unit(x.float() / 255)):
        assert got.dtype == torch.float32 and torch.allclose(got.double(), want, rtol=0, atol=1e-5)
    assert norm.from_uint8(x, channels_last=True).is_contiguous(memory_format=torch.channels_last)
    # a saved model's metadata without statistics means no normalisation
    assert torch.equal(Normalize.from_metadata({}, 3).from_unit(x.float()), x.float())
