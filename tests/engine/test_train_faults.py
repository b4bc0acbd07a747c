"""Faults on a real ``reslab train`` process: SIGKILL mid-epoch then --resume gives the
uninterrupted run's metrics and weights bit for bit; Ctrl-C (SIGINT) leaves a resumable
run marked interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from patience import HANG_S
from reslab.engine.train import WALL_CLOCK_FIELDS, TrainConfig, train

pytestmark = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
    reason="needs the fashion-mnist files (apt-get install dataset-fashion-mnist)",
)

# long enough epochs (32 steps) that a kill lands inside one, small enough for CI
OPTIONS = {
    "model": "resnet8",
    "width": 0.25,
    "epochs": 3,
    "batch_size": 64,
    "train_subset": 2048,
    "val_size": 200,
    "threads": 1,
    "drop_path_rate": 0.1,
    "probe_every": 5,
}


def _argv(out: Path) -> list[str]:
    args = [sys.executable, "-m", "reslab", "train", "--out", str(out)]
    for k, v in OPTIONS.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _start(out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A job started in the background by a shell without job control (a CI runner, 'cmd &')
    # inherits SIGINT ignored, and Python then never turns SIGINT into KeyboardInterrupt:
    # give the child the default disposition, as a terminal's Ctrl-C would find it.
    return subprocess.Popen(
        _argv(out),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _wait_for_epoch(proc: subprocess.Popen, out: Path, epoch: int, timeout: float = HANG_S) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        except (OSError, ValueError):
            rows = []
        if len(rows) >= epoch:
            return rows[epoch - 1]
        time.sleep(0.02)
    raise AssertionError("the run did not reach its first epoch in time")


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_FIELDS} for r in rows]


def _rows(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines()]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_identical(tmp_path):
    ref = tmp_path / "ref"
    train(TrainConfig(**OPTIONS), ref, progress=False)

    out = tmp_path / "killed"
    proc = _start(out)
    row = _wait_for_epoch(proc, out, 1)
    time.sleep(row["epoch_s"] * 0.4)  # well inside epoch 2
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "running" and summary["epochs_completed"] < OPTIONS["epochs"]
    assert not (out / "model.safetensors").exists()

    r = subprocess.run(
        [sys.executable, "-m", "reslab", "train", "--out", str(out), "--resume", "-q"],
        capture_output=True,
        text=True,
        timeout=HANG_S,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert _strip(_rows(out / "metrics.jsonl")) == _strip(_rows(ref / "metrics.jsonl"))
    assert _rows(out / "gradients.jsonl") == _rows(ref / "gradients.jsonl")
    a = load_file(str(ref / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ctrl_c_marks_the_run_interrupted(tmp_path):
    out = tmp_path / "run"
    proc = _start(out)
    _wait_for_epoch(proc, out, 1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 130
    assert "Traceback" not in err and "--resume" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs_completed"] >= 1
    latest = json.loads((out / "checkpoint" / "latest.json").read_text())
    assert latest["epoch"] == summary["epochs_completed"]


def _stop_after(epoch: int):
    """An on_epoch hook that interrupts the run once ``epoch`` is recorded (its checkpoint written)."""

    def hook(row: dict) -> None:
        if row["epoch"] >= epoch:
            raise KeyboardInterrupt

    return hook


def test_a_truncated_newest_checkpoint_resumes_from_the_one_before(tmp_path, tiny_train_config, capsys):
    """The last two checkpoints are kept, each with its checksums: with the newest truncated, the
    run resumes from the one before (saying so) and ends identical to an uninterrupted run."""
    cfg = tiny_train_config(epochs=3, drop_path_rate=0.1)
    straight = tmp_path / "straight"
    train(cfg, straight, progress=False)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, progress=False, on_epoch=_stop_after(2))
    ck = out / "checkpoint"
    assert sorted(p.name for p in ck.glob("epoch-*.json")) == ["epoch-0001.json", "epoch-0002.json"]
    newest = ck / "epoch-0002.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    capsys.readouterr()
    train(cfg, out, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "checkpoint of epoch 2" in err and "damaged" in err and "resuming from the checkpoint of epoch 1" in err
    assert _strip(_rows(out / "metrics.jsonl")) == _strip(_rows(straight / "metrics.jsonl"))
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_with_both_checkpoints_damaged_the_run_offers_the_real_fix(tmp_path, tiny_train_config):
    from reslab.errors import UsageError

    cfg = tiny_train_config(epochs=3)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, progress=False, on_epoch=_stop_after(2))
    for p in (out / "checkpoint").glob("epoch-*.pt"):
        p.write_bytes(b"\0" * 10)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UsageError, match=r"checkpoint of epoch 2 .* damaged .*epoch 1 .* damaged.*--overwrite"):
        train(cfg, out, resume=True, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
