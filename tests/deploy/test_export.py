"""reslab export / predict and the fuse/export/predict commands.

Fixtures are real run folders written by reslab.train (resnet8 at width 0.25 on a few
thousand fashion-mnist images); references are the unfused model's own outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reslab
from reslab.cli import main
from reslab.deploy.export import export, onnx_available
from reslab.deploy.fused import FusedResNet
from reslab.deploy.inputs import load_images
from reslab.deploy.predict import load_predictor, predict, read_archive_metadata
from reslab.deploy.sources import export_metadata, fused_source
from reslab.errors import UsageError
from reslab.nn.weights import load_model, read_metadata


def first_test_images(fashion, n: int) -> np.ndarray:
    """The first ``n`` fashion-mnist test images as uint8 N x 1 x 28 x 28."""
    return fashion.test_x[:n].numpy().copy()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_train_config) -> Path:
    """A real one-epoch run folder (technique 'norm': its merge has the most to fold)."""
    from reslab.engine.train import train

    out = tmp_path_factory.mktemp("runs") / "norm"
    cfg = tiny_train_config(technique="norm", epochs=1, train_subset=3000, val_size=500, eval_batch_size=1000)
    summary = train(cfg, out, progress=False)
    assert summary["status"] == "completed"
    return out


def unfused_top1(run: Path, x_u8: np.ndarray) -> np.ndarray:
    model = load_model(run / "model.safetensors").eval()
    meta = read_metadata(run / "model.safetensors")
    # The training engine's normalization, written out: (x / 255 - mean) / std.
    x = (torch.from_numpy(x_u8).float() / 255.0 - meta["mean"][0]) / meta["std"][0]
    with torch.no_grad():
        return model(x).argmax(1).numpy()


@pytest.mark.slow
def test_round_trip_train_fuse_export_reload_predict(run_dir: Path, tmp_path: Path, fashion) -> None:
    """Train 1 epoch, fuse, export, reload, predict: the same top-1 on 1,000 test images."""
    x_u8 = first_test_images(fashion, 1000)
    want = unfused_top1(run_dir, x_u8)
    assert len(set(want.tolist())) > 3  # a trained model, not a constant one
    fused_file = tmp_path / "model.safetensors"
    assert main(["fuse", str(run_dir), "--out", str(fused_file)]) == 0
    formats = [("torchscript", "m.pt"), ("exported", "m.pt2")]
    if onnx_available():
        formats.append(("onnx", "m.onnx"))
    files = [fused_file]
    for fmt, name in formats:
        assert main(["export", str(fused_file), "--format", fmt, "--out", str(tmp_path / name)]) == 0
        files.append(tmp_path / name)
    x = torch.from_numpy(x_u8).float() / 255.0
    for f in files:
        if f.suffix == ".onnx" and not _has_onnxruntime():
            continue
        predictor = load_predictor(f, trust=True)
        assert predictor.metadata["technique"] == "norm" and predictor.metadata["input_size"] == [1, 28, 28]
        top = predict(predictor, x, top=1)
        names = predictor.metadata["classes"]
        got = np.array([names.index(t[0][0]) for t in top])
        assert np.array_equal(got, want), f"{f.name}: {int((got != want).sum())} of 1000 differ"


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def test_exported_files_carry_metadata_and_reproduce_outputs(run_dir: Path, tmp_path: Path) -> None:
    fused, meta = fused_source(run_dir)
    info = export_metadata(fused, meta)
    assert info["model"] == "resnet8" and info["technique"] == "norm" and info["fused"] is True
    assert info["classes"][0] == "T-shirt/top" and len(info["mean"]) == 1
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = fused(x)
    for fmt, name in (("torchscript", "a.pt"), ("exported", "a.pt2")):
        path = export(fused, info, fmt, tmp_path / name)
        # Metadata is read from the zip without loading (running) the model.
        assert read_archive_metadata(path) == json.loads(json.dumps(info))
        got = load_predictor(path, trust=True).logits(x)
        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
        # A different batch size than the one traced/exported with works too.
        assert load_predictor(path, trust=True).logits(x[:1]).shape == (1, 10)


def test_code_carrying_formats_need_trust(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fused, meta = fused_source(run_dir)
    info = export_metadata(fused, meta)
    ts = export(fused, info, "torchscript", tmp_path / "a.pt")
    pt2 = export(fused, info, "exported", tmp_path / "a.pt2")

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("loaded an untrusted file")

    monkeypatch.setattr(torch.jit, "load", forbidden)
    monkeypatch.setattr(torch.export, "load", forbidden)
    for path in (ts, pt2):
        with pytest.raises(UsageError, match="--trust"):
            load_predictor(path)
        assert main(["predict", str(path), str(tmp_path / "x.npy")]) == 2


def test_onnx_export_says_what_is_missing(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    code = main(["export", str(run_dir), "--format", "onnx", "--out", str(out)])
    if onnx_available():
        assert code == 0 and out.is_file()
        import onnx

        props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
        assert json.loads(props["reslab"])["technique"] == "norm"
    else:
        assert code == 2 and not out.exists()


def test_predict_cli_png_and_npy(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], fashion) -> None:
    x_u8 = first_test_images(fashion, 4)
    want = unfused_top1(run_dir, x_u8)
    classes = read_metadata(run_dir / "model.safetensors")["classes"]
    png = tmp_path / "img0.png"
    Image.fromarray(x_u8[0, 0]).save(png)
    npy = tmp_path / "batch.npy"
    np.save(npy, x_u8[:, 0])  # N x H x W uint8
    assert main(["predict", str(run_dir), str(png), str(npy), "--top", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5
    assert lines[0].startswith(f"{png}: {classes[want[0]]} ")
    for i, line in enumerate(lines[1:]):
        assert line.startswith(f"{npy}[{i}]: {classes[want[i]]} ")
    assert main(["predict", str(run_dir), str(npy), "--json", "--top", "1"]) == 0
    rows = [json.loads(r) for r in capsys.readouterr().out.splitlines()]
    assert [r["top"][0]["class"] for r in rows] == [classes[k] for k in want]


def test_load_images_shapes_and_bad_input(tmp_path: Path, fashion) -> None:
    x_u8 = first_test_images(fashion, 3)
    for name, arr in (("hw", x_u8[0, 0]), ("nhw", x_u8[:, 0]), ("chw", x_u8[0]), ("nchw", x_u8)):
        np.save(tmp_path / f"{name}.npy", arr)
        batch, names = load_images([tmp_path / f"{name}.npy"], (1, 28, 28))
        assert batch.shape[1:] == (1, 28, 28) and len(names) == batch.shape[0]
        assert torch.equal(batch[0], torch.from_numpy(x_u8[0]).float() / 255.0)
    np.save(tmp_path / "float.npy", x_u8.astype(np.float32))  # 0..255 floats: ambiguous scale
    with pytest.raises(UsageError, match=r"\[0, 1\]"):
        load_images([tmp_path / "float.npy"], (1, 28, 28))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UsageError, match="not a readable"):
        load_images([tmp_path / "obj.npy"], (1, 28, 28))  # never unpickled
    np.save(tmp_path / "small.npy", x_u8[:, :, :10, :10])
    with pytest.raises(UsageError, match="the model takes"):
        load_images([tmp_path / "small.npy"], (1, 28, 28))
    # A larger RGB image is converted to one channel and resized.
    Image.fromarray(np.zeros((56, 40, 3), np.uint8)).save(tmp_path / "rgb.png")
    batch, _ = load_images([tmp_path / "rgb.png"], (1, 28, 28))
    assert batch.shape == (1, 1, 28, 28)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UsageError, match="not a readable image"):
        load_images([tmp_path / "bad.png"], (1, 28, 28))


def test_cli_errors_are_one_line_and_keep_results(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fused.safetensors"
    out.write_bytes(b"precious")
    assert main(["fuse", str(run_dir), "--out", str(out)]) == 2
    assert out.read_bytes() == b"precious"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and "Traceback" not in err
    assert main(["fuse", str(run_dir), "--out", str(out), "--overwrite"]) == 0
    loaded = load_predictor(out)
    assert isinstance(loaded.run, FusedResNet)
    assert main(["fuse", str(tmp_path / "missing"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert main(["export", str(run_dir), "--format", "exported", "--out", str(tmp_path / "x.onnx")]) == 2
    assert main(["predict", str(out), str(tmp_path / "missing.png")]) == 2
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert main(["fuse", str(empty), "--out", str(tmp_path / "y.safetensors")]) == 2
    capsys.readouterr()


def test_fuse_weights_without_run_metadata(tmp_path: Path) -> None:
    """Weights saved by hand (reslab.nn.weights.save_weights, no input size) still fuse."""
    from reslab.nn.weights import save_weights

    model = reslab.build_model("resnet8", technique="fixup", in_channels=3, num_classes=5, width=0.25).eval()
    save_weights(tmp_path / "w.safetensors", model)
    assert main(["fuse", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "f.safetensors")]) == 0
    # Export needs an input size then, and says so.
    assert main(["export", str(tmp_path / "f.safetensors"), "-f", "exported", "-o", str(tmp_path / "f.pt2")]) == 2
    code = main(
        [
            "export",
            str(tmp_path / "f.safetensors"),
            "-f",
            "exported",
            "-o",
            str(tmp_path / "f.pt2"),
            "--input-size",
            "3x32x32",
        ]
    )
    assert code == 0
    assert read_archive_metadata(tmp_path / "f.pt2")["input_size"] == [3, 32, 32]


def test_torchscript_of_an_unfused_model_goes_through_export(run_dir: Path, tmp_path: Path) -> None:
    """``torch.jit.script`` cannot compile a reslab block (it holds a technique object, a Python
    class TorchScript cannot type): the documented way is ``reslab export --format torchscript``,
    which traces, fused or (``--no-fuse``) not, and reproduces the model's outputs."""
    from reslab.deploy.sources import load_source

    model, _ = load_source(run_dir)
    with pytest.raises(Exception, match=r"Technique|Module|script"):
        torch.jit.script(model)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model.eval()(x)
    for extra, name in (([], "fused.pt"), (["--no-fuse"], "plain.pt")):
        assert main(["export", str(run_dir), "--format", "torchscript", "--out", str(tmp_path / name), *extra]) == 0
        got = load_predictor(tmp_path / name, trust=True).logits(x)
        assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())
