"""reslab compare --launcher slurm|ray: the same tiny grid through each engine, checked against
the local launcher's results (training is deterministic per seed and thread count, so every
cell's test accuracy and loss must match exactly), on this machine: submitit's local executor
stands in for Slurm (same worker code, signals and requeue), a local Ray cluster for Ray.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grids import run_starts, tiny_args
from patience import HANG_S
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
    assert {yaml_threads(d) for d in (out / RUNS_DIR).iterdir()} == {1}  # as the reference's 2 jobs
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
    argv = grid_args(out, "--launcher", "slurm", "--submitit-cluster", "local", "--workers", "2", "--set", "threads=1")
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
        # threads set for the grid reach every run (the default here would be this machine's cores)
        assert main(grid_args(out, "--launcher", "ray", "--workers", "2", "--set", "threads=1")) == 0
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
        assert proc.poll() is None and time.monotonic() - t0 < HANG_S, "the worker did not start training"
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
    stdout, _ = proc.communicate(timeout=HANG_S)
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
    stdout, _ = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 0, stdout
    assert "1 run trained (0 diverged), 0 already finished, 0 failed" in stdout
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


# -- a real Ray cluster (`ray start --head`), reached, refused and lost ----------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_env(home: Path, **extra: str) -> dict[str, str]:
    """This test's environment with its own HOME (so no token of the real one is seen or left)
    and no Ray settings of the caller's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "HOME": str(home), **extra}


class RayCluster:
    """``ray start --head --block`` in a session of its own and a temporary folder of its own:
    stopping it kills that process group only (what ``ray stop --force`` does to every Ray
    instance of the machine), so other Ray users of this machine are left alone."""

    def __init__(self, home: Path, port: int | None = None, cpus: int = 2) -> None:
        import tempfile

        self.port = port or _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp = tempfile.mkdtemp(prefix="rl17-", dir="/tmp")  # short: Ray's socket paths are limited
        ray_cli = str(Path(sys.executable).parent / "ray")
        self.proc = subprocess.Popen(
            [
                *(ray_cli, "start", "--head", "--port", str(self.port), "--num-cpus", str(cpus)),
                *("--temp-dir", self.temp, "--include-dashboard=false", "--disable-usage-stats", "--block"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_ray_env(home),
            start_new_session=True,
        )
        said = []
        for line in self.proc.stdout:  # synchronise on Ray's own word, not on a sleep
            said.append(line)
            if "Ray runtime started" in line:
                break
        else:
            self.stop()
            pytest.fail("ray start --head did not start:\n" + "".join(said[-20:]))
        self.said = "".join(said)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc.stdout.close()
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture
def ray_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    return home


def _reslab(argv: list[str], env: dict[str, str], timeout: float = HANG_S) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "reslab", *argv], capture_output=True, text=True, env=env, timeout=timeout
    )
    return proc, time.monotonic() - t0


@needs_ray
def test_a_wrong_ray_address_fails_in_seconds_with_one_line(tmp_path: Path, ray_home: Path) -> None:
    """Nothing listens: one line naming the address, the cause and the fix, exit 2, well within
    30 s (Ray alone retried for over 13 minutes), and --out not even created."""
    out = tmp_path / "res"
    port = _free_port()
    proc, took = _reslab(grid_args(out, "--launcher", "ray", "--ray-address", f"127.0.0.1:{port}"), _ray_env(ray_home))
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert f"nothing listens at 127.0.0.1:{port}" in err[0] and "ray start --head" in err[0]
    assert took < 120  # seconds, not the 13 minutes Ray retries for (loose: the suite runs under load)
    assert not out.exists()


@pytest.mark.slow
@needs_ray
def test_token_authentication_is_named_with_its_fix(tmp_path: Path, ray_home: Path) -> None:
    """A token in ~/.ray/auth_token makes 'ray start' enable token authentication; a driver
    without RAY_AUTH_MODE=token sends none. reslab says so in one line, with the fix."""
    token = ray_home / ".ray" / "auth_token"
    token.parent.mkdir()
    token.write_text("0123456789abcdef" * 4)
    cluster = RayCluster(ray_home)
    try:
        assert "Token authentication is enabled" in cluster.said
        out = tmp_path / "res"
        proc, took = _reslab(grid_args(out, "--launcher", "ray", "--ray-address", cluster.address), _ray_env(ray_home))
    finally:
        cluster.stop()
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert "requires token authentication" in err[0] and "RAY_AUTH_MODE=token" in err[0]
    assert took < 120  # seconds, not the 13 minutes Ray retries for (loose: the suite runs under load)
    assert not out.exists()


@pytest.mark.slow
@needs_ray
def test_ray_cluster_by_default_matches_a_default_local_run(
    tmp_path: Path, ray_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No thread or CPU option anywhere: the Ray workers train with the threads a local run uses
    (this machine's cores), so every run's results are the same, bit for bit."""
    local = tmp_path / "local"
    assert main(grid_args(local)) == 0
    cluster = RayCluster(ray_home)
    try:
        out = tmp_path / "ray"
        proc, _ = _reslab(grid_args(out, "--launcher", "ray", "--ray-address", cluster.address), _ray_env(ray_home))
    finally:
        cluster.stop()
    assert proc.returncode == 0, proc.stderr
    assert cell_results(out) == cell_results(local)
    threads = {yaml_threads(d) for d in (out / RUNS_DIR).iterdir()}
    assert threads == {yaml_threads(d) for d in (local / RUNS_DIR).iterdir()} and len(threads) == 1


def yaml_threads(run: Path) -> int | None:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["threads"]


@pytest.mark.slow
@needs_ray
def test_a_lost_ray_cluster_is_named_and_the_same_command_resumes(
    tmp_path: Path, ray_home: Path, long_reference: Path
) -> None:
    """The cluster is stopped (SIGKILL of all its processes, as 'ray stop --force') while a run
    trains: the driver says so in one line within 30 s, exits 75 (not 1, "some run failed"),
    releases the dead worker's claim, and the same command on a restarted cluster resumes the
    run from its checkpoint to the result of an uninterrupted one."""
    from reslab.engine.config import default_threads
    from reslab.study.claims import Claims
    from reslab.study.results import CLAIMS_DIR

    port = _free_port()
    out = tmp_path / "res"
    argv = grid_args(
        out, "--launcher", "ray", "--ray-address", f"127.0.0.1:{port}", "--train-subset", "1024", "--no-report", **LONG
    )
    env = _ray_env(ray_home)
    cluster = RayCluster(ray_home, port, cpus=default_threads())
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "reslab", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        worker = _worker_mid_run(out, proc)
        cluster.stop()
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=HANG_S)
        took = time.monotonic() - t0
    finally:
        cluster.stop()
    ours = [ln for ln in err.splitlines() if ln.startswith("reslab compare:")]
    assert proc.returncode == 75, err
    assert len(ours) == 1 and "lost the Ray cluster at" in ours[0], err
    assert "0 runs finished, 1 interrupted (resnet8-baseline-s0)" in ours[0]
    assert "re-run the same command to resume" in ours[0]
    assert took < 120  # seconds, not the 13 minutes Ray retries for (loose: the suite runs under load)
    assert not os.path.exists(f"/proc/{worker}")
    assert Claims(out / CLAIMS_DIR).active([LONG_CELL]) == {}  # the dead worker's claim is released
    assert not list((out / CLAIMS_DIR).glob(f"{LONG_CELL}.*.lease"))

    cluster = RayCluster(ray_home, port, cpus=default_threads())  # the same cluster again
    try:
        proc2, _ = _reslab(argv, env)
    finally:
        cluster.stop()
    assert proc2.returncode == 0, proc2.stderr
    _assert_resumed_once(out, long_reference)


def _fake_slurm(bin_dir: Path, sinfo: str) -> None:
    """An sbatch that must not be reached and an sinfo running ``sinfo`` (shell)."""
    bin_dir.mkdir()
    for name, body in (("sbatch", "echo 'sbatch must not run' >&2; exit 1"), ("sinfo", sinfo)):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)


@needs_submitit
@pytest.mark.parametrize(
    ("sinfo", "argv", "message"),
    [
        (
            "printf 'cpu\\ngpu\\ngpu\\n'",
            ["--partition", "gpus"],
            "Slurm has no partition 'gpus' (sinfo lists cpu, gpu)",
        ),
        (
            "echo 'sinfo: error: Unable to contact slurm controller (connect failure)' >&2; exit 1",
            [],
            "cannot reach Slurm: 'sinfo' said: sinfo: error: Unable to contact slurm controller",
        ),
    ],
)
def test_slurm_that_cannot_take_the_grid_is_one_line_before_the_header(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    sinfo: str,
    argv: list[str],
    message: str,
) -> None:
    """Checked with sinfo before anything is submitted or written (no real Slurm here: a fake
    sinfo stands in; what sbatch itself refuses is reported as 'Slurm refused the job array')."""
    _fake_slurm(tmp_path / "bin", sinfo)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    out = tmp_path / "r"
    assert main(grid_args(out, "--launcher", "slurm", *argv, quiet=False)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [["--epochs", "-1"], ["--launcher", "slurm", "--submitit-cluster", "slurm"], ["--set", "threads=0"]],
)
def test_usage_errors_come_before_the_header(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    out = tmp_path / "r"
    assert main(grid_args(out, *argv, quiet=False)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0], err
    assert not out.exists()


def test_set_threads_reaches_every_run_of_a_local_grid(tmp_path: Path) -> None:
    out = tmp_path / "r"
    assert main(grid_args(out, "--set", "threads=1", "--jobs", "1", seeds="1")) == 0
    assert [yaml_threads(d) for d in sorted((out / RUNS_DIR).iterdir())] == [1, 1]
    assert "CPU threads per run: 1" in (out / "report.md").read_text()


def test_a_worker_that_cannot_write_the_results_folder_says_so(tmp_path: Path) -> None:
    from reslab.study.launch.common import folder_problem

    (tmp_path / "file").write_text("")
    problem = folder_problem(str(tmp_path / "file" / "res"))
    assert problem is not None and "seen by a worker on" in problem and "a folder every worker can write" in problem
    assert folder_problem(str(tmp_path / "res")) is None


@pytest.mark.slow
@needs_submitit
def test_slurm_workers_that_all_vanish_are_a_lost_cluster(tmp_path: Path) -> None:
    """Every worker killed outright mid-run (as by 'scancel' of the array or lost nodes; here
    submitit's local executor, SIGKILL): exit 75 with one line and the resume hint, not 1."""
    out = tmp_path / "res"
    engine = ("--launcher", "slurm", "--submitit-cluster", "local", "--retries", "0")
    argv = grid_args(out, *engine, "--train-subset", "1024", "--no-report", **LONG)
    proc = subprocess.Popen(
        [sys.executable, "-m", "reslab", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    os.kill(_worker_mid_run(out, proc), signal.SIGKILL)
    _, err = proc.communicate(timeout=HANG_S)
    ours = [ln for ln in err.splitlines() if ln.startswith("reslab compare:")]
    assert proc.returncode == 75, err
    assert len(ours) == 1 and "lost every worker of submitit 'local' jobs" in ours[0], err
    assert (
        "0 runs finished, 1 interrupted (resnet8-baseline-s0)" in ours[0]
        and "claim of lost workers released" in ours[0]
    )
    assert "re-run the same command to resume" in ours[0]
