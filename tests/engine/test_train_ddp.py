"""``torchrun --nproc_per_node=2 -m reslab train`` (gloo on the CPU) against one process
with the same global batch.

Why the comparison uses ``fixup``: with BatchNorm, each rank normalises its half of the
batch with its own statistics (DDP does not synchronise them), so the forward pass itself
differs from the single-process one and no tight tolerance could be justified. Fixup has
no batch statistics, so each image's loss is independent of its batch-mates; every rank
sees the same images and augmentations as its slice of the single-process batch (both
draw the global batch from the same generator), and DDP's gradient average of the two
half-batch means equals the full-batch mean. The only difference left is the order of
floating-point summation (float32 rounding, about 1e-7 relative per step), so after 16
SGD steps the weights must agree to 1e-5 absolute and the losses to 1e-5 relative.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from patience import HANG_S

pytestmark = [
    pytest.mark.skipif(
        not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
        reason="needs the fashion-mnist files (apt-get install dataset-fashion-mnist)",
    ),
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]

ARGS = (
    "--model resnet8 --width 0.25 --technique fixup --epochs 2 --batch-size 64 --train-subset 512 "
    "--val-size 200 --lr 0.2 --warmup 0.1 -q"
).split()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = shutil.which("torchrun")
    launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    two = subprocess.run(
        [*launcher, "--standalone", "--nproc_per_node=2", "-m", "reslab", "train", *ARGS, "--out", str(tmp_path / "2")],
        capture_output=True,
        text=True,
        timeout=HANG_S,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, "-m", "reslab", "train", *ARGS, "--threads", "1", "--out", str(tmp_path / "1")],
        capture_output=True,
        text=True,
        timeout=HANG_S,
        env=env,
    )
    assert one.returncode == 0, one.stderr[-3000:]

    s1 = json.loads((tmp_path / "1" / "summary.json").read_text())
    s2 = json.loads((tmp_path / "2" / "summary.json").read_text())
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    # only rank 0 wrote: one summary line on stdout
    assert two.stdout.count('"status"') == 1

    r1 = [json.loads(x) for x in (tmp_path / "1" / "metrics.jsonl").read_text().splitlines()]
    r2 = [json.loads(x) for x in (tmp_path / "2" / "metrics.jsonl").read_text().splitlines()]
    assert len(r1) == len(r2) == 2
    for a, b in zip(r1, r2, strict=True):
        assert a["lr"] == b["lr"]
        for k in ("train_loss", "val_loss"):
            assert b[k] == pytest.approx(a[k], rel=1e-5), k
        # accuracies are counts over the same images; a logit tie flip would move one image
        assert abs(b["val_acc"] - a["val_acc"]) <= 1 / 200 + 1e-12
    w1 = load_file(str(tmp_path / "1" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "2" / "model.safetensors"))
    # training moved the weights far more than the tolerance, so the agreement means something
    from reslab.engine.sources import derive_seed
    from reslab.nn.models import build_model

    torch.manual_seed(derive_seed(0, 0, 0))
    init = build_model("resnet8", technique="fixup", in_channels=1, width=0.25).state_dict()
    assert max((w1[k].float() - init[k].float()).abs().max().item() for k in w1) > 1e-2
    diff = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
    assert diff < 1e-5
    assert s2["test_acc"] == pytest.approx(s1["test_acc"], abs=2 / 10000)
