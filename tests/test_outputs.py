"""Files a run, fuse and export write are readable by others like any file (0644 under
umask 022), and git ignores every generated format."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from reslab.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


def test_outputs_are_0644(tmp_path, tiny_train_config, umask_022, capsys):
    from reslab.engine.train import train

    run = tmp_path / "run"
    assert (
        train(tiny_train_config(epochs=1, train_subset=128, val_size=64), run, progress=False)["status"] == "completed"
    )
    out = tmp_path / "models"
    assert main(["fuse", str(run), "--out", str(out / "fused.safetensors")]) == 0
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out / "m.pt")]) == 0
    modes = {**_modes(run), **{f"models/{k}": v for k, v in _modes(out).items()}}
    # the weights, the checkpoint pair and the fused/exported models are among them
    for name in ("model.safetensors", "checkpoint/epoch-0001.safetensors", "checkpoint/epoch-0001.pt"):
        assert name in modes
    assert {"models/fused.safetensors", "models/m.pt"} <= set(modes)
    assert {k: oct(v) for k, v in modes.items() if v != 0o644} == {}


def test_gitignore_covers_generated_formats():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    names = [
        "model.safetensors",
        "checkpoint/epoch-0001.pt",
        "scale.pt2",
        "scale.onnx",
        "scale.onnx.data",
        "scale.ts",
        "model.pth",
        ".model.safetensors.abc123.tmp",
        "train-images-idx3-ubyte.gz.part",
        "tensorboard/events.out.tfevents.1700000000.host.1.0",
        "runs/scale/metrics.jsonl",
        "results/quick/report.md",
        "probe/init/probe.json",
    ]
    r = subprocess.run(["git", "check-ignore", "--no-index", *names], cwd=ROOT, capture_output=True, text=True)
    assert sorted(r.stdout.split()) == sorted(names)
