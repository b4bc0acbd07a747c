"""The engine, the fuser and compare's workers on a CUDA device.

Every test here is marked ``cuda``: it skips on a machine without a GPU (CI) and runs in
``benchmarks/gpu.sh``. The CPU suite covers the same behaviour; these check what only a
device shows: tensors and models really placed on it, mixed precision, and each of
compare's workers pinned to its own GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from patience import HANG_S
from reslab import build_model, fuse, list_techniques
from reslab.study.results import STARTS_FILE

pytestmark = pytest.mark.cuda


def test_training_runs_on_the_gpu_and_resumes(tmp_path: Path, tiny_train_config) -> None:
    from reslab.engine.train import train

    settings = {"device": "cuda", "schedule": "constant", "warmup": 0}
    out = tmp_path / "run"
    summary = train(tiny_train_config(epochs=2, **settings), out, progress=False)
    assert summary["status"] == "completed"
    assert summary["test_acc"] > 0.2  # above chance (0.1) after two short epochs
    assert "device: cuda" in (out / "config.yaml").read_text()
    # one more epoch from the checkpoint, on the device again
    more = train(tiny_train_config(epochs=3, **settings), out, resume=True, progress=False)
    assert more["status"] == "completed"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]


@pytest.mark.parametrize("technique", list_techniques())
def test_fused_models_match_on_the_gpu(technique: str) -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", technique=technique, num_classes=10, in_channels=1).cuda()
    model.train()
    x = torch.randn(64, 1, 28, 28, device="cuda")
    with torch.no_grad():
        for _ in range(3):  # move the BN statistics away from their init
            model(x)
    model.eval()
    fused = fuse(model).cuda()
    with torch.inference_mode():
        ref, out = model(x), fused(x)
    assert out.device.type == "cuda"
    assert float((ref - out).abs().max() / ref.abs().max()) < 1e-4


def test_compare_pins_each_worker_to_a_gpu(tmp_path: Path) -> None:
    out = tmp_path / "res"
    args = [sys.executable, "-m", "reslab", "compare", "--models", "resnet8", "--width", "0.25"]
    args += ["--train-subset", "512", "--val-size", "256", "--epochs", "1", "--techniques", "baseline,scale"]
    args += ["--seeds", "2", "--no-probe", "--quiet", "--jobs", "2", "--device", "cuda", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert res.returncode == 0, res.stderr
    pinned = set()
    for run in (out / "runs").iterdir():
        (start,) = [json.loads(x) for x in (run / STARTS_FILE).read_text().splitlines()]
        pinned.add(start["gpus"])
    n = torch.cuda.device_count()
    assert pinned <= {str(i) for i in range(n)}
    assert len(pinned) == min(2, n)  # two workers on two GPUs, or both on the only one
