"""predict's inputs: colour arrays are converted exactly like colour image files, and a
bad file among many is reported and skipped (exit 2 at the end) instead of aborting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reslab.deploy.inputs import load_images
from reslab.errors import UsageError

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("size", [(1, 28, 28), (3, 28, 28), (1, 20, 16)])
def test_rgb_npy_matches_the_same_pixels_as_a_png(tmp_path, size):
    rgb = RNG.integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)  # N x H x W x 3, as PIL/OpenCV give them
    pngs = []
    for i, a in enumerate(rgb):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
        pngs.append(tmp_path / f"{i}.png")
    from_png, _ = load_images(pngs, size)
    np.save(tmp_path / "batch.npy", rgb)
    np.save(tmp_path / "one.npy", rgb[0])  # H x W x 3
    from_npy, names = load_images([tmp_path / "batch.npy"], size)
    one, _ = load_images([tmp_path / "one.npy"], size)
    assert from_npy.shape == (3, *size) and len(names) == 3
    assert torch.equal(from_npy, from_png) and torch.equal(one[0], from_png[0])


def test_float_rgb_npy_is_converted_like_pil(tmp_path):
    rgb = RNG.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.save(tmp_path / "f.npy", rgb.astype(np.float32) / 255.0)
    np.save(tmp_path / "chw.npy", (rgb.astype(np.float32) / 255.0).transpose(2, 0, 1)[None])  # 1 x 3 x H x W
    png, _ = load_images([tmp_path / "a.png"], (1, 28, 28))
    for name in ("f.npy", "chw.npy"):
        x, _ = load_images([tmp_path / name], (1, 28, 28))
        # PIL rounds its grayscale to uint8: the float conversion is within half a level
        assert x.shape == (1, 1, 28, 28) and float((x - png).abs().max()) <= 0.5 / 255 + 1e-6


def test_grayscale_arrays_unchanged(tmp_path):
    g = RNG.integers(0, 256, (4, 28, 28), dtype=np.uint8)  # N x H x W, one channel
    np.save(tmp_path / "g.npy", g)
    x, _ = load_images([tmp_path / "g.npy"], (1, 28, 28))
    assert torch.equal(x[:, 0], torch.from_numpy(g).float() / 255)
    np.save(tmp_path / "g1.npy", g[:, None])  # N x 1 x H x W
    x3, _ = load_images([tmp_path / "g1.npy"], (3, 28, 28))  # grayscale feeds an RGB model like a PNG does
    assert x3.shape == (4, 3, 28, 28) and torch.equal(x3[:, 2], x[:, 0])


def test_messages_name_the_real_problem(tmp_path):
    (tmp_path / "text.npy").write_text("1 2 3\n")
    with pytest.raises(UsageError) as e:
        load_images([tmp_path / "text.npy"], (1, 28, 28))
    assert "no NumPy header" in str(e.value) and "allow_pickle" not in str(e.value)
    (tmp_path / "folder").mkdir()
    with pytest.raises(UsageError, match="is a folder, not an image"):
        load_images([tmp_path / "folder"], (1, 28, 28))


def test_cli_skips_bad_files_and_exits_2(tmp_path, tiny_train_config, capsys):
    from reslab.cli import main
    from reslab.engine.train import train

    run = tmp_path / "run"
    train(tiny_train_config(epochs=1, train_subset=128, val_size=64), run, progress=False)
    good = []
    for i in range(2):
        Image.fromarray(RNG.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / f"good{i}.png")
        good.append(str(tmp_path / f"good{i}.png"))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "folder").mkdir()
    files = [good[0], str(tmp_path / "bad.png"), str(tmp_path / "missing.png"), str(tmp_path / "folder"), good[1]]
    assert main(["predict", str(run), *files]) == 2
    cap = capsys.readouterr()
    out = cap.out.strip().splitlines()
    assert [line.split(":")[0] for line in out] == good  # the good ones, in order
    err = cap.err.strip().splitlines()
    assert "Traceback" not in cap.err and len(err) == 4
    for bad, line in zip(files[1:4], err, strict=False):
        assert line.startswith(f"reslab predict: skipped {bad}: ")
    assert err[-1] == "reslab predict: 3 of 5 files skipped (see above); fix or remove them"
    assert main(["predict", str(run), *good]) == 0
