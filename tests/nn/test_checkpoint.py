"""Weights files: round trip, atomicity and refusal of unsafe or broken files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from reslab import build_model
from reslab.errors import UsageError
from reslab.files import atomic_write_text, torch_load_safe
from reslab.nn.weights import load_model, read_metadata, save_weights


def test_round_trip_rebuilds_the_same_model(tmp_path: Path) -> None:
    model = build_model("resnet8", technique="layerscale", in_channels=1, technique_args={"init_value": 0.5}).eval()
    path = tmp_path / "m.safetensors"
    save_weights(path, model, extra={"input_size": [1, 28, 28]})
    meta = read_metadata(path)
    assert meta["spec"]["technique"] == "layerscale"
    assert meta["input_size"] == [1, 28, 28]
    again = load_model(path).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_truncated_file_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_weights(path, build_model("resnet8"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="not a readable safetensors file"):
        load_model(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_is_never_executed(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(UsageError, match="cannot be loaded safely"):
        torch_load_safe(path)
    assert not (Path.cwd() / "pwned").exists()


def test_truncated_torch_file_is_not_called_unsafe(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "epoch-0001.pt"
    torch.save({"x": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:1500])  # a kill mid-copy, a full disk
    with pytest.raises(UsageError) as e:
        torch_load_safe(path)
    msg = str(e.value)
    assert "truncated" in msg and "re-create it" in msg and "safely" not in msg and "\n" not in msg


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    atomic_write_text(path, "first")
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it
