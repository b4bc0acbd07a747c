"""reslab compare --launcher slurm|ray: the same tiny grid through each engine, checked against
the local launcher's results (training is deterministic per seed and thread count, so every
cell's test accuracy and loss must match exactly), on this machine: submitit's local executor
stands in for Slurm (same worker code, signals and requeue), a local Ray cluster for Ray.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grids import run_starts, tiny_args
from reslab.cli import main
from reslab.errors import UsageError
from reslab.study.results import RUNS_DIR

needs_submitit = pytest.mark.skipif(
    importlib.util.find_spec("submitit") is None, reason="submitit is not installed (pip install 'reslab[slurm]')"
)
needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'reslab[ray]')"
)


def grid_args(out: Path, *extra: str, **kw: object) -> list[str]:
    return tiny_args(out, *extra, subset=256, val_size=64, test_subset=256, **kw)


def cell_results(out: Path) -> dict[tuple, tuple]:
    """Every cell's outcome as the report recorded it (no timings: those differ run to run)."""
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    keys = ("status", "epochs_done", "test_acc", "test_loss", "final_val_acc", "best_val_acc")
    return {(r["model"], r["technique"], r["seed"]): tuple(r[k] for k in keys) for r in rows}


def starts(out: Path) -> dict[str, list[dict]]:
    return {d.name: run_starts(d) for d in sorted((out / RUNS_DIR).iterdir())}


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple, tuple]:
    """The grid through the local launcher: 2 jobs of 1 thread, as each launcher worker below."""
    out = tmp_path_factory.mktemp("local") / "res"
    assert main(grid_args(out, "--jobs", "2")) == 0
    results = cell_results(out)
    assert len(results) == 4 and all(v[0] == "completed" for v in results.values())
    return results


def _assert_grid_done_once(out: Path, reference: dict[tuple, tuple]) -> None:
    assert cell_results(out) == reference
    assert {name: len(rows) for name, rows in starts(out).items()} == {
        f"resnet8-{t}-s{s}": 1 for t in ("baseline", "scale") for s in (0, 1)
    }
    md = (out / "report.md").read_text()
    assert "Complete grid: all 4 runs finished" in md


@pytest.mark.slow
@needs_submitit
def test_slurm_launcher_through_submitit_local_matches_the_local_launcher(
    tmp_path: Path, local_reference: dict[tuple, tuple], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "res"
    argv = grid_args(
        out, "--launcher", "slurm", "--submitit-cluster", "local", "--workers", "2", "--cpus-per-task", "1"
    )
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "4 runs trained (0 diverged), 0 already finished, 0 failed" in stdout
    assert f"report: {out.absolute() / 'report.md'}" in stdout
    _assert_grid_done_once(out, local_reference)
    # trained by the workers' processes (which of the two took which cell depends on timing)
    pids = {row["pid"] for rows in starts(out).values() for row in rows}
    assert 1 <= len(pids) <= 2 and os.getpid() not in pids
    # two workers, with logs in RESULTS/slurm
    logs = sorted((out / "slurm").glob("*_0_log.err"))
    assert len(logs) == 2 and all("reslab worker: pid" in p.read_text() for p in logs)
    # the finished grid again, through submitit's in-process executor: nothing is trained
    assert main([*argv[: argv.index("local")], "debug", *argv[argv.index("local") + 1 :]]) == 0
    assert "0 runs trained (0 diverged), 4 already finished, 0 failed" in capsys.readouterr().out
    assert {name: len(rows) for name, rows in starts(out).items()} == dict.fromkeys(starts(out), 1)


@pytest.mark.slow
@needs_ray
def test_ray_launcher_on_a_local_cluster_matches_the_local_launcher(
    tmp_path: Path, local_reference: dict[tuple, tuple], capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    out = tmp_path / "res"
    sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        assert main(grid_args(out, "--launcher", "ray", "--workers", "2", "--cpus-per-task", "1")) == 0
    finally:
        ray.shutdown()
        signal.signal(signal.SIGTERM, sigterm)  # ray.init put its own in
    stdout = capsys.readouterr().out
    assert "4 runs trained (0 diverged), 0 already finished, 0 failed" in stdout
    _assert_grid_done_once(out, local_reference)
    pids = {row["pid"] for rows in starts(out).values() for row in rows}
    assert 1 <= len(pids) <= 2 and os.getpid() not in pids  # Ray's worker processes trained them


#: a one-cell grid of 4 epochs of about half a second each here: long enough for a signal or a
#: kill to land in epochs 2 to 4, after the first epoch's checkpoint
LONG = {"techniques": "baseline", "seeds": "1", "epochs": 4}
LONG_CELL = "resnet8-baseline-s0"


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-cell grid, uninterrupted, through the local launcher (1 job of all the cores,
    like the workers below); no report: the run folder is what is compared."""
    out = tmp_path_factory.mktemp("long") / "res"
    assert main(grid_args(out, "--jobs", "1", "--train-subset", "1024", "--no-report", **LONG)) == 0
    return out / RUNS_DIR / LONG_CELL


def _worker_mid_run(out: Path, proc: subprocess.Popen) -> int:
    """Wait until the run has checkpointed its first epoch (it is in its second); its worker's pid."""
    run = out / RUNS_DIR / LONG_CELL
    t0 = time.monotonic()
    while True:
        try:
            if json.loads((run / "checkpoint" / "latest.json").read_text())["epoch"] >= 1:
                return run_starts(run)[0]["pid"]
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None and time.monotonic() - t0 < 240, "the worker did not start training"
        time.sleep(0.01)


#: what differs between two identical runs: wall-clock measurements and who ran them
WALL = {"epoch_s", "elapsed_s", "images_per_s", "host", "pid"}


def _assert_resumed_once(out: Path, reference: Path) -> None:
    """Two training starts of the cell, the second resumed from the checkpoint, and every epoch's
    metrics and the final summary of the uninterrupted run."""
    run = out / RUNS_DIR / LONG_CELL
    rows = run_starts(run)
    assert [r["resumed"] for r in rows] == [False, True] and rows[0]["pid"] != rows[1]["pid"]

    def metrics(d: Path) -> list[dict]:
        return [
            {k: v for k, v in json.loads(x).items() if k not in WALL}
            for x in (d / "metrics.jsonl").read_text().splitlines()
        ]

    def summary(d: Path) -> dict:
        return {k: v for k, v in json.loads((d / "summary.json").read_text()).items() if k not in WALL}

    assert [m["epoch"] for m in metrics(run)] == [1, 2, 3, 4]
    assert metrics(run) == metrics(reference)
    assert summary(run) == summary(reference) and summary(run)["status"] == "completed"


@pytest.mark.slow
@needs_submitit
def test_slurm_worker_stops_cleanly_on_the_time_limit_signal_and_resumes_when_requeued(
    tmp_path: Path, long_reference: Path
) -> None:
    """SIGUSR2 (what Slurm sends before the time limit, through submitit) mid-training: the run
    stops at a step boundary, submitit requeues the worker, and the requeued worker resumes the
    run from its checkpoint to the result of an uninterrupted run."""
    out = tmp_path / "res"
    engine = ("--launcher", "slurm", "--submitit-cluster", "local")
    argv = grid_args(out, *engine, "--train-subset", "1024", "--no-report", **LONG)
    proc = subprocess.Popen([sys.executable, "-m", "reslab", *argv], stdout=subprocess.PIPE, text=True)
    os.kill(_worker_mid_run(out, proc), signal.SIGUSR2)
    stdout, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, stdout
    _assert_resumed_once(out, long_reference)
    log = "".join(p.read_text() for p in sorted((out / "slurm").glob("*_0_log.*")))  # ours and submitit's
    assert "stopped at a step boundary by SIGUSR2" in log and "Requeued job" in log


@pytest.mark.slow
@needs_ray
def test_ray_task_killed_mid_run_is_retried_and_resumes(tmp_path: Path, long_reference: Path) -> None:
    """kill -9 of the Ray worker process mid-training: Ray runs the task again (max_retries), and
    the new one takes the dead one's claim over at once (same host, pid gone) and resumes."""
    from reslab.engine.config import default_threads

    cpus = str(default_threads())  # the reference's threads, for identical arithmetic
    out = tmp_path / "res"
    engine = ("--launcher", "ray", "--workers", "1", "--cpus-per-task", cpus, "--retries", "1")
    argv = grid_args(out, *engine, "--train-subset", "1024", "--no-report", **LONG)
    proc = subprocess.Popen([sys.executable, "-m", "reslab", *argv], stdout=subprocess.PIPE, text=True)
    os.kill(_worker_mid_run(out, proc), signal.SIGKILL)
    stdout, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, stdout
    assert "1 runs trained (0 diverged), 0 already finished, 0 failed" in stdout
    _assert_resumed_once(out, long_reference)


@pytest.mark.parametrize(
    ("launcher", "module", "extra"), [("slurm", "submitit", "reslab[slurm]"), ("ray", "ray", "reslab[ray]")]
)
def test_missing_engine_is_one_line_naming_the_extra(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    launcher: str,
    module: str,
    extra: str,
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    out = tmp_path / "r"
    assert main(grid_args(out, "--launcher", launcher)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"pip install '{extra}'" in err[0] and f"--launcher {launcher}" in err[0]
    assert not out.exists()


@needs_submitit
def test_slurm_without_sbatch_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert main(grid_args(tmp_path / "r", "--launcher", "slurm")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sbatch, which is not on PATH" in err[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "2"], "--workers applies only to --launcher slurm or ray"),
        (["--launcher", "ray", "--partition", "gpu"], "--partition does not apply to --launcher ray"),
        (["--launcher", "slurm", "--ray-address", "auto"], "--ray-address does not apply to --launcher slurm"),
        (["--launcher", "ray", "--workers", "0"], "--workers must be at least 1"),
        (["--launcher", "slurm", "--gpus-per-task", "-1"], "--gpus-per-task must be 0 or more"),
        (["--launcher", "slurm", "--jobs", "2"], "ask for more --workers instead of --jobs"),
        (["--launcher", "slurm", "--time", "soon"], "--time takes minutes or HH:MM:SS"),
        (["--launcher", "slurm", "--time", "0"], "--time must be positive"),
        (["--launcher", "slurm", "--mem", "lots"], "--mem takes a size like 32G"),
        (["--launcher", "slurm", "--slurm-arg", "=x"], "--slurm-arg takes KEY=VALUE"),
    ],
)
def test_bad_launcher_options_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    out = tmp_path / "r"
    assert main(grid_args(out, *argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_unknown_launcher_is_argparse_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(grid_args(tmp_path / "r", "--launcher", "mpi"))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'mpi'" in err[0]


def test_slurm_option_forms() -> None:
    from reslab.study.launch import parse_mem, parse_slurm_args, parse_time

    assert [parse_time(t) for t in ("240", "4:00:00", "90:30", "1-00:00:00", "2-12", "0:00:01")] == [
        240,
        240,
        91,
        1440,
        3600,
        1,
    ]
    assert [parse_mem(m) for m in ("32g", "16000M", "64GB", "500")] == ["32G", "16000M", "64G", "500"]
    with pytest.raises(UsageError):
        parse_mem("64B")  # bytes are not a unit sbatch takes
    assert parse_slurm_args(["account=proj", "--qos=high", "exclusive", "mail-type=END"]) == {
        "account": "proj",
        "qos": "high",
        "exclusive": True,
        "mail_type": "END",
    }
    with pytest.raises(UsageError):
        parse_slurm_args(["1x=2"])


def test_default_workers_follow_the_first_round(tmp_path: Path) -> None:
    from reslab.cli import build_parser
    from reslab.cli.commands.compare import build_grid
    from reslab.study.launch import MAX_DEFAULT_WORKERS, default_workers

    def workers(*argv: str) -> int:
        args = build_parser(["compare"]).parse_args(["compare", *argv])
        grid, _, _ = build_grid(args)
        return default_workers(grid, tmp_path / "none", None)

    out = tmp_path / "res"
    assert workers(*tiny_args(out, seeds="3")[1:]) == 6  # a fixed grid: every cell
    # a sequential grid: the first look's seeds (3) of each technique, not the plan's most
    assert workers(*tiny_args(out, "--until-decided", "--max-seeds", "8", seeds="3")[1:]) == 6
    assert workers("--preset", "paper") == MAX_DEFAULT_WORKERS


@pytest.mark.slow
@needs_submitit
def test_a_usage_error_in_the_workers_is_one_line_from_the_driver(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The dataset is opened by the workers (the driver may run where the data is not): a
    missing one still ends the command with one line and status 2."""
    out = tmp_path / "r"
    engine = ("--launcher", "slurm", "--submitit-cluster", "local", "--workers", "1")
    assert main(grid_args(out, *engine, "--data-dir", str(tmp_path / "nowhere"), seeds="1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere does not exist" in err[0], err
    assert not (out / RUNS_DIR).exists()


def test_default_ray_workers_fit_the_cluster() -> None:
    """Tasks beyond what the cluster runs at once would start only after the grid is done."""
    from types import SimpleNamespace

    from reslab.study.launch import ray_capacity as _ray_capacity

    cluster = SimpleNamespace(cluster_resources=lambda: {"CPU": 16.0, "GPU": 2.0})
    assert _ray_capacity(cluster, cpus=4, gpus=0) == 4
    assert _ray_capacity(cluster, cpus=4, gpus=1) == 2  # GPUs run out first
    assert _ray_capacity(SimpleNamespace(cluster_resources=dict), cpus=1, gpus=0) == 1  # nodes still joining
