"""reslab compare --pack: seeds of one model and technique trained as one packed model, with
everything a run has alone (its folder, claim, checkpoints, resume) and the grid machinery
around it (jobs, shards, concurrent processes, launchers). Real tiny grids, as test_compare.py."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from grids import run_starts, tiny_args, wait_for
from patience import HANG_S
from reslab.cli import main
from reslab.engine.devices import pick_device
from reslab.study.grid import Grid
from reslab.study.packing import AUTO_GAIN, choose_pack, packed_rate, parse_pack, resolve_pack, seeds_at_once
from reslab.study.prework import check_data
from reslab.study.results import RUNS_DIR

CELLS = [f"resnet8-{t}-s{s}" for t in ("baseline", "scale") for s in (0, 1)]


def config(out: Path, name: str) -> dict:
    return yaml.safe_load((out / RUNS_DIR / name / "config.yaml").read_text())


def metrics(out: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (out / RUNS_DIR / name / "metrics.jsonl").read_text().splitlines()]


def summary(out: Path, name: str) -> dict:
    return json.loads((out / RUNS_DIR / name / "summary.json").read_text())


def started_once(out: Path) -> bool:
    return {n: len(run_starts(out / RUNS_DIR / n)) for n in CELLS} == dict.fromkeys(CELLS, 1)


@pytest.mark.slow
def test_a_packed_grid_trains_each_run_as_it_would_alone(tmp_path: Path) -> None:
    alone, packed = tmp_path / "alone", tmp_path / "packed"
    assert main(tiny_args(alone, "--set", "threads=1", epochs=2)) == 0
    assert main(tiny_args(packed, "--pack", "2", "--set", "threads=1", epochs=2)) == 0
    for name in CELLS:
        # the run's folder says which pack it trained in; the run trained alone records none
        pack = config(packed, name)["pack"]
        tech = name.rsplit("-", 1)[0]
        assert pack["size"] == 2 and pack["members"] == [f"{tech}-s0", f"{tech}-s1"]
        assert "pack" not in config(alone, name)
        a, p = metrics(alone, name), metrics(packed, name)
        assert [r["epoch"] for r in p] == [1, 2]
        # the same computation through grouped kernels: equal to rounding, not bit for bit
        assert p[0]["train_loss"] == pytest.approx(a[0]["train_loss"], rel=1e-3)
        sa, sp = summary(alone, name), summary(packed, name)
        assert sp["status"] == sa["status"] == "completed"
        assert abs(sp["test_acc"] - sa["test_acc"]) <= 0.02
    assert started_once(packed)
    assert "Complete grid: all 4 runs finished" in (packed / "report.md").read_text()


@pytest.mark.slow
def test_kill_9_of_a_packed_grid_resumes_every_run_of_the_pack(tmp_path: Path) -> None:
    out = tmp_path / "res"
    args = [sys.executable, "-m", "reslab", *tiny_args(out, "--pack", "2", "--set", "threads=1", epochs=3)]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    pack = [out / RUNS_DIR / f"resnet8-baseline-s{s}" for s in (0, 1)]

    def mid_pack() -> bool:
        # both members checkpointed (they write one after the other, so a kill between the two
        # leaves them at different epochs: then each resumes alone, from its own checkpoint)
        try:
            return all(json.loads((d / "checkpoint" / "latest.json").read_text())["epoch"] >= 1 for d in pack)
        except (OSError, ValueError, KeyError):
            return False

    wait_for(mid_pack, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = {n: metrics(out, n) for n in ("resnet8-baseline-s0", "resnet8-baseline-s1")}
    res = subprocess.run(args, capture_output=True, text=True, timeout=HANG_S)
    assert res.returncode == 0, res.stderr
    wall = ("epoch_s", "elapsed_s", "images_per_s")
    for name, before in killed.items():
        after = metrics(out, name)
        assert [r["epoch"] for r in after] == [1, 2, 3]
        for b, a in zip(before, after, strict=False):  # resumed, not restarted
            assert {k: v for k, v in b.items() if k not in wall} == {k: v for k, v in a.items() if k not in wall}
        starts = run_starts(out / RUNS_DIR / name)
        assert [s["resumed"] for s in starts] == [False, True]
        assert summary(out, name)["status"] == "completed"


@pytest.mark.slow
def test_packs_with_jobs_shards_and_a_second_process_train_each_run_once(tmp_path: Path) -> None:
    out = tmp_path / "res"
    base = ["--pack", "2", "--set", "threads=1"]
    # a second compare process on the same folder, started at the same time as the first shard
    other = subprocess.Popen(
        [sys.executable, "-m", "reslab", *tiny_args(out, *base, "--jobs", "2", epochs=2)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert main(tiny_args(out, *base, "--shard", "1/2", "--jobs", "2", epochs=2)) == 0
        assert main(tiny_args(out, *base, "--shard", "2/2", epochs=2)) == 0
    finally:
        _, err = other.communicate(timeout=HANG_S)
    assert other.returncode == 0, err
    assert started_once(out)  # claims: whichever process took a cell, it trained it once
    assert all(summary(out, n)["status"] == "completed" for n in CELLS)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("submitit") is None, reason="submitit is not installed")
def test_packs_reach_the_launchers_workers(tmp_path: Path) -> None:
    out = tmp_path / "res"
    argv = tiny_args(out, "--pack", "2", "--launcher", "slurm", "--submitit-cluster", "local", "--workers", "1")
    assert main([*argv, "--set", "threads=1"]) == 0
    assert started_once(out)
    assert {config(out, n)["pack"]["size"] for n in CELLS} == {2}
    pids = {row["pid"] for n in CELLS for row in run_starts(out / RUNS_DIR / n)}
    assert os.getpid() not in pids  # trained by the worker, packed


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--pack", "0"], "--pack must be at least 1, got 0"),
        (["--pack", "many"], "--pack must be a positive number of runs or 'auto', got 'many'"),
        (["--pack", "2", "--probe-every", "4"], "--pack 2: the gradient-norm probe is not recorded in a pack"),
        (
            ["--pack", "2", "--set", "cuda_graphs=true", "--device", "cpu"],
            "--pack 2: cuda_graphs: CUDA graphs need a CUDA device, not cpu",
        ),
    ],
)
def test_bad_pack_options_are_one_line_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], words: str
) -> None:
    out = tmp_path / "res"
    assert main(tiny_args(out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
    assert not (out / RUNS_DIR).exists()


def test_pack_sizes_resolve_from_the_grid_and_the_device() -> None:
    train = {"epochs": 1, "width": 0.25, "train_subset": 256, "val_size": 64, "batch_size": 16}
    grid = Grid(["resnet8"], ["baseline", "scale"], [0, 1, 2], train)
    ds = check_data(grid)
    cpu = pick_device("cpu")
    assert parse_pack(None) == "auto" and parse_pack("auto") == "auto" and parse_pack("4") == 4
    assert seeds_at_once(grid) == 3
    # the CPU: auto is 1 (packing is not a lever there); an explicit size is capped at the seeds at once
    assert resolve_pack(grid, "auto", cpu, ds) == (1, "", {})
    assert resolve_pack(grid, 2, cpu, ds) == (2, "", {})  # no probe on the CPU: the estimate is a run's time
    k, note, _ = resolve_pack(grid, 8, cpu, ds)
    assert k == 3 and "needs at most 3 at once" in note
    seq = Grid(["resnet8"], ["baseline", "scale"], list(range(6)), train, sequential={"min_seeds": 4, "max_seeds": 6})
    assert seeds_at_once(seq) == 4
    # the probe the GPU's auto uses, run here on the CPU: a rate per size, and a size it can defend
    cfg = grid.config(grid.cells()[0], threads=1)
    assert packed_rate(cfg, ds, cpu, 2) > 0
    k, gain = choose_pack(cfg, ds, cpu, 2)
    # the gain is the chosen size's throughput over one run's: 1 when it keeps 1, and a doubling
    # is taken only when it gained AUTO_GAIN
    assert (k, gain) == (1, 1.0) or (k == 2 and gain >= AUTO_GAIN)


def test_cuda_graphs_refuse_packs_only_where_a_graph_cannot_run() -> None:
    """A pack replays its step as a CUDA graph on a CUDA device; elsewhere, and with what packs
    refuse anyway (compile, probe_every), the refusal stays, in words."""
    from reslab.engine.config import TrainConfig
    from reslab.study.packing import refusal

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert refusal(TrainConfig(cuda_graphs=True, device="cuda")) == ""
    assert refusal(TrainConfig(cuda_graphs=True), cuda) == ""  # auto, decided where it runs
    assert refusal(TrainConfig(cuda_graphs=True)) == ""
    for cfg, device in ((TrainConfig(cuda_graphs=True, device="cpu"), None), (TrainConfig(cuda_graphs=True), cpu)):
        assert refusal(cfg, device) == "cuda_graphs: CUDA graphs need a CUDA device, not cpu (drop cuda_graphs)"
    assert "torch.compile" in refusal(TrainConfig(cuda_graphs=True, compile=True), cuda)
    assert "gradient-norm probe" in refusal(TrainConfig(cuda_graphs=True, probe_every=5), cuda)


def test_a_pack_that_fails_fails_its_runs_not_the_cells_held_elsewhere(tmp_path: Path, monkeypatch) -> None:
    """A pack's training raising fails the runs it trained, with the error in one line; a cell of
    the pack that another worker holds stays that worker's (it was never this pack's)."""
    from reslab.study import cells as cells_mod
    from reslab.study.claims import Claims
    from reslab.study.results import CLAIMS_DIR, FAILED_DIR, Cell

    grid = Grid(["resnet8"], ["baseline"], [0, 1, 2], {"epochs": 1, "width": 0.25, "train_subset": 256})
    results = tmp_path / "res"
    (results / RUNS_DIR).mkdir(parents=True)
    held = Claims(results / CLAIMS_DIR).try_claim("resnet8-baseline-s1")  # another worker's claim
    assert held is not None

    def boom(grid, cells, results, threads):
        raise RuntimeError("CUDA out of memory\n(a second line the record leaves out)")

    monkeypatch.setattr(cells_mod, "run_pack", boom)
    cells = [Cell("resnet8", "baseline", s) for s in (0, 1, 2)]
    done = dict(cells_mod.claim_and_run_pack(grid, cells, results, threads=1))
    assert done[cells[1]].kind == "held"
    for c in (cells[0], cells[2]):
        assert done[c].kind == "failed" and done[c].error == "RuntimeError: CUDA out of memory"
        cells_mod.record_failure(results, c, done[c].error)
    assert sorted(p.name for p in (results / FAILED_DIR).iterdir()) == [
        "resnet8-baseline-s0.json",
        "resnet8-baseline-s2.json",
    ]
    assert json.loads((results / FAILED_DIR / "resnet8-baseline-s0.json").read_text())["error"] == (
        "RuntimeError: CUDA out of memory"
    )
    # the failed pack's claims are released; the held one is still its holder's
    assert set(Claims(results / CLAIMS_DIR).active()) == {"resnet8-baseline-s1"}
