"""Run states a user can act on: a run killed or failed before its first checkpoint
restarts plainly (or with --resume), a live run is not trampled, a stale 'running' is
recognised, finished runs are extended only where the schedule allows, and the
best-validation weights are kept beside the final ones."""

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
from safetensors import safe_open
from safetensors.torch import load_file

from patience import HANG_S
from reslab.cli import main
from reslab.engine.runs import write_json

SRC = str(Path(__file__).resolve().parents[2] / "src")
TINY = ["--model", "resnet8", "--width", "0.25", "--batch-size", "64", "--train-subset", "256", "--val-size", "64"]
TINY += ["--threads", "1", "--quiet"]


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _killed_before_first_checkpoint(out: Path) -> None:
    """A real 'reslab train' process, SIGKILLed as soon as it has written its run files."""
    argv = [sys.executable, "-m", "reslab", "train", "--out", str(out), *TINY, "--epochs", "3"]
    argv[argv.index("--train-subset") + 1] = "4096"  # a first epoch long enough to kill inside
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (out / "summary.json").is_file():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=HANG_S)
    assert not (out / "checkpoint" / "latest.json").exists(), "killed too late for this test"
    assert _summary(out)["status"] == "running" and _summary(out)["pid"] == proc.pid


@pytest.mark.slow
@pytest.mark.parametrize("how", ["plain", "resume"])
def test_killed_before_first_checkpoint_restarts(tmp_path, capsys, how):
    from reslab.engine.runs import run_state

    out = tmp_path / "run"
    _killed_before_first_checkpoint(out)
    assert run_state(out) == "stale"  # its process is gone
    argv = ["train", "--out", str(out), *TINY, "--epochs", "1"] + (["--resume"] if how == "resume" else [])
    assert main(argv) == 0, capsys.readouterr().err
    s = _summary(out)
    assert s["status"] == "completed" and s["epochs_completed"] == 1 and s["epochs"] == 1


def test_failed_before_its_first_checkpoint_restarts(tmp_path, monkeypatch, capsys):
    import reslab.engine.train as train_mod

    out = tmp_path / "run"
    real = train_mod.evaluate

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_mod, "evaluate", oom)
    assert main(["train", "--out", str(out), *TINY, "--epochs", "1"]) == 2
    err = _err(capsys)
    assert "out of memory at batch size 64" in err and "--batch-size (e.g. 32)" in err
    assert f"the same command (or --resume) restarts {out}" in err
    assert _summary(out)["status"] == "failed"
    monkeypatch.setattr(train_mod, "evaluate", real)
    # the message's promise holds: the same command restarts it
    assert main(["train", "--out", str(out), *TINY, "--epochs", "1"]) == 0
    assert _summary(out)["status"] == "completed"


def test_a_live_run_is_not_trampled(tmp_path, capsys):
    from reslab.engine.runs import run_state

    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (out / "summary.json").write_text(
            json.dumps({"status": "running", "pid": sleeper.pid, "host": os.uname().nodename})
        )
        assert run_state(out) == "running"
        for extra in ([], ["--resume"]):
            assert main(["train", "--out", str(out), *TINY, "--epochs", "1", *extra]) == 2
            assert f"is being trained right now by process {sleeper.pid}" in _err(capsys)
        assert json.loads((out / "summary.json").read_text())["pid"] == sleeper.pid  # untouched
    finally:
        sleeper.kill()
        sleeper.wait()
    assert run_state(out) == "stale"


def test_checkpointed_unfinished_run_messages_agree(tmp_path, capsys, tiny_train_config):
    from reslab.engine.train import train

    out = tmp_path / "run"
    train(tiny_train_config(epochs=1), out, progress=False)
    s = _summary(out)
    s.update(status="running", pid=2**22 + 12345)  # killed after its checkpoint: no such process
    write_json(out / "summary.json", s)
    assert main(["train", "--out", str(out), *TINY, "--epochs", "1"]) == 2
    assert "pass --resume to continue it" in _err(capsys)


def test_extend_a_finished_constant_run_equals_training_longer(tmp_path, capsys):
    opts = [*TINY, "--schedule", "constant", "--warmup", "0", "--lr", "0.05"]
    short, long_ = tmp_path / "short", tmp_path / "long"
    assert main(["train", "--out", str(short), *opts, "--epochs", "1"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(short), *opts, "--epochs", "1", "--quiet"]) == 2
    assert "or --resume --epochs N to extend it" in _err(capsys)  # offered where it works
    assert main(["train", "--out", str(short), "--resume", "--epochs", "2", "--quiet"]) == 0
    assert main(["train", "--out", str(long_), *opts, "--epochs", "2"]) == 0
    s = _summary(short)
    assert s["status"] == "completed" and s["epochs_completed"] == 2 and s["epochs"] == 2
    a, b = load_file(short / "model.safetensors"), load_file(long_ / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_finished_onecycle_run_is_not_extended(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, "--epochs", "1"]) == 0
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    # training it again offers only what works: --overwrite or another folder, not --resume --epochs
    assert main(["train", "--out", str(out), *TINY, "--epochs", "1", "--quiet"]) == 2
    err = _err(capsys)
    assert "--overwrite" in err and "another --out" in err and "--resume" not in err
    assert main(["train", "--out", str(out), "--resume", "--epochs", "3", "--quiet"]) == 2
    err = _err(capsys)
    assert "cannot be extended honestly" in err and "down to zero" in err and "--schedule constant" in err
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 2
    assert "already completed (1 epochs); to extend it pass --epochs N" in _err(capsys)
    assert (out / "model.safetensors").read_bytes() == before


def test_best_weights_kept_beside_final(tmp_path, tiny_train_config):
    from reslab.engine.train import train
    from reslab.nn.weights import load_model

    out = tmp_path / "run"
    s = train(tiny_train_config(epochs=3), out, progress=False)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    best_row = max(rows, key=lambda r: r["val_acc"])  # the first of equals, as training keeps it
    assert s["best_epoch"] == best_row["epoch"]
    with safe_open(str(out / "model-best.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["reslab"])
    assert meta["epoch"] == best_row["epoch"] and meta["val_acc"] == best_row["val_acc"]
    assert meta["classes"] and meta["input_size"] == [1, 28, 28]  # usable by fuse/predict like the final one
    model = load_model(out / "model-best.safetensors")
    final = load_file(out / "model.safetensors")
    same = all(torch.equal(v, final[k]) for k, v in model.state_dict().items())
    assert same == (best_row["epoch"] == 3)
