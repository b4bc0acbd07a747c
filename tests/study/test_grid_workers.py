"""Many workers on one results folder, and workers that are killed: real ``reslab compare``
processes on tiny grids (resnet8 at quarter width on a few hundred Fashion-MNIST images).

What is proved, from the run folders themselves:
* concurrent ``compare`` processes train every cell exactly once (``starts.jsonl`` holds one
  line per training start, written under the cell's claim) and write one report;
* a worker killed with SIGKILL mid-run has its cell taken over and resumed, and the results
  equal an uninterrupted grid's;
* SIGTERM stops the grid like Ctrl-C: status 143, runs ``interrupted``, no claim left held,
  and the same command finishes with the uninterrupted grid's results;
* SIGKILL of the parent leaves no process behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grids import run_starts, tiny_args, wait_for
from patience import HANG_S

pytestmark = pytest.mark.slow

#: wall-clock fields of a metrics row (the rest must be equal between runs)
WALL = {"epoch_s", "elapsed_s", "images_per_s"}


def grid_args(out: Path, *, techniques: str, seeds: str, epochs: int, subset: int, jobs: int) -> list[str]:
    """A tiny grid as a command line, with its progress lines (some tests read them)."""
    argv = tiny_args(
        out,
        "--jobs",
        str(jobs),
        techniques=techniques,
        seeds=seeds,
        epochs=epochs,
        subset=subset,
        test_subset=512,
        quiet=False,
    )
    return [sys.executable, "-m", "reslab", *argv]


def run_results(out: Path) -> dict[str, tuple]:
    """Per run: status, test accuracy and its metrics without wall-clock fields."""
    found = {}
    for d in sorted((out / "runs").iterdir()):
        summary = json.loads((d / "summary.json").read_text())
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        by_epoch = {r["epoch"]: {k: v for k, v in r.items() if k not in WALL} for r in rows}
        found[d.name] = (summary["status"], summary.get("test_acc"), [by_epoch[e] for e in sorted(by_epoch)])
    return found


def statuses(out: Path) -> dict[str, str]:
    """Each run's recorded status (a run stopped while still starting has recorded none)."""
    return {
        d.name: json.loads((d / "summary.json").read_text())["status"]
        for d in (out / "runs").iterdir()
        if (d / "summary.json").exists()
    }


def held_leases(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "claims").glob("*.lease"))


def mid_run(out: Path) -> Path | None:
    """A run that has checkpointed an epoch and is still training."""
    for d in sorted((out / "runs").glob("*")) if (out / "runs").is_dir() else []:
        try:
            epoch = json.loads((d / "checkpoint" / "latest.json").read_text())["epoch"]
            status = json.loads((d / "summary.json").read_text())["status"]
        except (OSError, ValueError, KeyError):
            continue
        if epoch >= 1 and status == "running":
            return d
    return None


def session_processes(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid``."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append(int(p.name))
    return found


ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
TESTS = Path(__file__).resolve().parents[1]


def uninterrupted(factory: pytest.TempPathFactory, settings: dict) -> dict[str, tuple]:
    """The results of one plain, uninterrupted ``compare`` of the grid: the reference."""
    out = factory.mktemp("ref") / "res"
    res = subprocess.run(grid_args(out, **settings), env=ENV, capture_output=True, text=True, timeout=HANG_S)
    assert res.returncode == 0, res.stderr
    return run_results(out)


# -- concurrent processes ------------------------------------------------------------------

CONCURRENT = {"techniques": "baseline,scale,norm", "seeds": "2", "epochs": 1, "subset": 384, "jobs": 1}


@pytest.fixture(scope="module")
def concurrent_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    return uninterrupted(tmp_path_factory, CONCURRENT)


@pytest.mark.parametrize("processes", [2, 3])
def test_concurrent_compare_processes_train_each_cell_once(
    tmp_path: Path, processes: int, concurrent_reference: dict[str, tuple]
) -> None:
    out = tmp_path / "res"
    # every process holds a cell before any trains (tests/grid_barrier.py): the work is shared
    # however slowly a loaded machine starts them
    env = {
        **ENV,
        "RESLAB_TEST_BARRIER": f"{tmp_path / 'arrived'}:{processes}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
    }
    argv = [*grid_args(out, **CONCURRENT), "--import", "grid_barrier"]
    procs = [
        subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    outputs = [p.communicate(timeout=HANG_S) for p in procs]
    assert [p.returncode for p in procs] == [0] * processes, [e for _, e in outputs]
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 6
    for run in runs:
        assert len(run_starts(run)) == 1, run.name  # trained once, by one process
    trainers = {s["pid"] for run in runs for s in run_starts(run)}
    assert len(trainers) == processes  # the work was shared: each process trained a cell
    # the report is written once, by the last process to finish; the others say so
    written = [o for o, _ in outputs if f"report: {out / 'report.md'}" in o]
    assert len(written) == 1, outputs
    assert all("report: not written by this process" in o for o, _ in outputs if o not in written)
    assert run_results(out) == concurrent_reference
    assert held_leases(out) == []


# -- killed workers and signals ------------------------------------------------------------

KILLED = {"techniques": "baseline,scale", "seeds": "1", "epochs": 3, "subset": 1024, "jobs": 2}


@pytest.fixture(scope="module")
def killed_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    return uninterrupted(tmp_path_factory, KILLED)


def test_a_killed_worker_has_its_cell_taken_over(tmp_path: Path, killed_reference: dict[str, tuple]) -> None:
    out = tmp_path / "res"
    proc = subprocess.Popen(
        grid_args(out, **KILLED), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(lambda: mid_run(out) is not None, proc)
    run = mid_run(out)
    assert run is not None
    victim = json.loads((run / "summary.json").read_text())["pid"]
    assert victim != proc.pid  # a worker process, not the scheduler
    os.kill(victim, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 0, stderr
    assert "died (killed by signal 9); its run is resumed from its checkpoint" in stderr
    first, second = run_starts(run)
    assert first["pid"] == victim and not first["resumed"]
    assert second["resumed"] and second["pid"] != victim
    assert run_results(out) == killed_reference
    assert held_leases(out) == []


def test_sigterm_stops_like_ctrl_c_and_the_same_command_resumes(
    tmp_path: Path, killed_reference: dict[str, tuple]
) -> None:
    out = tmp_path / "res"
    args = grid_args(out, **KILLED)
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: mid_run(out) is not None, proc)
    proc.send_signal(signal.SIGTERM)  # to the parent only, as Slurm's scancel --signal would
    _, stderr = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 143, stderr
    assert "reslab compare: terminated (SIGTERM); finished runs are kept" in stderr
    assert "Traceback" not in stderr
    found = statuses(out)
    assert "interrupted" in found.values() and "running" not in found.values(), found
    assert held_leases(out) == []  # every claim released
    res = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=HANG_S)
    assert res.returncode == 0, res.stderr
    assert run_results(out) == killed_reference


def test_killing_the_parent_leaves_no_process_behind(tmp_path: Path) -> None:
    out = tmp_path / "res"
    proc = subprocess.Popen(
        grid_args(out, **KILLED),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own session: every process it starts is counted below
    )
    wait_for(lambda: mid_run(out) is not None, proc)
    assert len(session_processes(proc.pid)) >= 3  # the scheduler and its two workers
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 30
    while session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert session_processes(proc.pid) == []
    # the workers stopped like after Ctrl-C: their runs say so and their claims are released
    found = statuses(out)
    assert "interrupted" in found.values() and "running" not in found.values(), found
    assert held_leases(out) == []
