"""reslab.claims: exactly one holder per name, takeover of dead or silent holders, and the
processes reslab.pool starts.

The race tests start real processes that all try to claim (or take over) one name at the
same moment; whatever the interleaving, exactly one may win.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from patience import HANG_S
from reslab.pool import RemoteError, WorkerDied, WorkerPool
from reslab.study.claims import Claims, Holder, _proc_start


def _write_lease(root: Path, name: str, gen: int, host: str, pid: int, start: str | None, age_s: float = 0.0) -> Path:
    path = root / f"{name}.{gen}.lease"
    path.write_text(Holder(host, pid, start, "t" * 32).to_json())
    if age_s:
        _backdate(path, age_s)
    return path


def _backdate(path: Path, age_s: float) -> None:
    """Make ``path`` look last renewed ``age_s`` seconds ago: a lease's age without waiting for it."""
    t = time.time() - age_s
    os.utime(path, (t, t))


def _wait_for(cond: Callable[[], bool], what: str) -> None:
    """Poll ``cond()`` until it holds; only a hang (HANG_S) fails."""
    deadline = time.monotonic() + HANG_S
    while not cond():
        assert time.monotonic() < deadline, f"hung waiting for {what}"
        time.sleep(0.01)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # reaped: nothing runs under it now (reuse within this test is improbable)


def test_one_holder_and_release(tmp_path: Path) -> None:
    a, b = Claims(tmp_path, lease_s=60), Claims(tmp_path, lease_s=60)
    lease = a.try_claim("cell")
    assert lease is not None and lease.gen == 1
    assert b.try_claim("cell") is None  # held by a live process (this one) and fresh
    assert b.holder("cell") == lease.holder
    assert b.active() == {"cell": lease.holder}
    assert lease.renew()
    lease.release()
    assert b.active() == {}
    again = b.try_claim("cell")
    assert again is not None and again.gen == 1  # released, not taken over: a fresh claim


def test_dead_holder_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    old = _write_lease(tmp_path, "cell", 1, socket.gethostname(), _dead_pid(), None)
    claims = Claims(tmp_path, lease_s=3600)  # age plays no part: the process is gone
    assert claims.holder("cell") is None
    lease = claims.try_claim("cell")
    assert lease is not None and lease.gen == 2
    assert not old.exists()  # the older generation is removed by the winner


def test_reused_pid_is_not_mistaken_for_the_holder(tmp_path: Path) -> None:
    # our own pid, but "started" at another time: the holder that wrote it is gone
    me = os.getpid()
    start = _proc_start(me)
    if start is None:
        pytest.skip("no /proc start times on this system")
    _write_lease(tmp_path, "cell", 1, socket.gethostname(), me, str(int(start) + 1))
    assert Claims(tmp_path, lease_s=3600).try_claim("cell") is not None


def test_remote_holder_is_judged_by_renewal_age(tmp_path: Path) -> None:
    # a holder on another host cannot be asked whether it lives: only the age of its last
    # renewal (against the file system's clock) says so
    fresh = _write_lease(tmp_path, "fresh", 1, "elsewhere.example", 1, None, age_s=5)
    _write_lease(tmp_path, "silent", 1, "elsewhere.example", 1, None, age_s=300)
    claims = Claims(tmp_path, lease_s=60)
    assert claims.try_claim("fresh") is None
    assert fresh.exists()
    lease = claims.try_claim("silent")
    assert lease is not None and lease.gen == 2


def test_a_stalled_holder_learns_it_lost_the_claim(tmp_path: Path) -> None:
    a = Claims(tmp_path, lease_s=60)
    lease = a.try_claim("cell")
    assert lease is not None
    assert Claims(tmp_path, lease_s=60).try_claim("cell") is None  # renewed just now: held
    _backdate(lease.path, 600)  # no renewal for ten leases: another worker may take over
    taker = Claims(tmp_path, lease_s=60).try_claim("cell")
    assert taker is not None and taker.gen == 2
    assert not lease.renew() and not lease.held()
    lease.release()  # releasing a lost claim must not remove the taker's
    assert taker.held()
    # after the taker releases and a third worker claims generation 1 anew, the stalled
    # holder's name matches again, but its token does not
    taker.release()
    third = Claims(tmp_path, lease_s=60).try_claim("cell")
    assert third is not None and third.gen == 1
    assert not lease.renew()


def test_renewal_thread_keeps_a_claim_and_reports_a_loss(tmp_path: Path) -> None:
    """The lease is made stale by hand (its time set ten leases back) and the renewal thread makes
    it fresh again, so no one can take it over; once its file is removed (what a takeover does),
    on_lost is called, once. Every wait is for an event, never a fixed time."""
    claims = Claims(tmp_path, lease_s=60)
    lease = claims.try_claim("cell")
    assert lease is not None
    _backdate(lease.path, 600)
    stale_at = lease.path.stat().st_mtime
    assert claims.holder("cell") is None  # stale: without a renewal another worker may take it
    lost = threading.Event()
    calls: list[bool] = []

    def on_lost() -> None:
        calls.append(True)
        lost.set()

    with lease.renewed(on_lost, every=0.05):
        _wait_for(lambda: lease.path.stat().st_mtime > stale_at, "the renewal thread to renew")
        assert claims.holder("cell") == lease.holder
        assert Claims(tmp_path, lease_s=60).try_claim("cell") is None
        assert not lost.is_set()
        # simulate a takeover by another host: remove our generation, as the winner does
        lease.path.unlink()
        assert lost.wait(HANG_S), "the renewal thread did not report the loss"
    assert calls == [True]
    assert claims.active() == {}


def _race(args: tuple[str, str, float]) -> int:
    root, name, lease_s = args
    time.sleep(max(0.0, float(name.split("@")[1]) - time.time()))  # start together
    lease = Claims(root, lease_s).try_claim(name.split("@")[0])
    return 0 if lease is None else lease.gen


@pytest.mark.parametrize("stale_first", [False, True], ids=["fresh-claim", "takeover"])
def test_racing_processes_claim_once(tmp_path: Path, stale_first: bool) -> None:
    if stale_first:
        _write_lease(tmp_path, "cell", 3, socket.gethostname(), _dead_pid(), None)
    at = time.time() + 3.0
    ctx = mp.get_context("spawn")
    with ctx.Pool(8) as pool:
        gens = pool.map(_race, [(str(tmp_path), f"cell@{at}", 60.0)] * 8)
    winners = [g for g in gens if g]
    assert winners == [4 if stale_first else 1], gens
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".lease"))
    assert names == [f"cell.{winners[0]}.lease"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_torn_lease_file_counts_by_its_age(tmp_path: Path) -> None:
    (tmp_path / "cell.1.lease").write_text('{"host": ')  # a crash mid-write
    assert Claims(tmp_path, lease_s=60).try_claim("cell") is None
    t = time.time() - 120
    os.utime(tmp_path / "cell.1.lease", (t, t))
    assert Claims(tmp_path, lease_s=60).try_claim("cell") is not None


# -- reslab.pool ---------------------------------------------------------------------------


def _echo(x: int) -> int:
    return x * 2


def _boom(x: int) -> int:
    raise ValueError(f"bad {x}")


def _suicide(x: int) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return x


def test_pool_survives_a_killed_worker_and_reports_errors() -> None:
    with WorkerPool(2) as pool:
        pool.submit("a", _suicide, 1)
        pool.submit("b", _echo, 21)
        done = {}
        while pool.running():
            for d in pool.wait(timeout=10):
                done[d.tag] = d
        assert isinstance(done["a"].error, WorkerDied) and "signal 9" in str(done["a"].error)
        assert done["b"].value == 42  # the other task is unaffected
        pool.submit("c", _boom, 3)  # the replaced worker takes tasks
        (d,) = pool.wait(timeout=HANG_S)
        assert isinstance(d.error, RemoteError) and str(d.error) == "ValueError: bad 3"
        assert sorted(pool.map_unordered(_echo, [1, 2, 3])) == [2, 4, 6]


def test_pool_workers_die_with_their_parent(tmp_path: Path) -> None:
    # a parent that starts a pool and is then killed with SIGKILL: no worker may outlive it
    script = tmp_path / "parent.py"
    script.write_text(
        "import json, sys, time\n"
        "from reslab.pool import WorkerPool\n"
        "pool = WorkerPool(2)\n"
        "pool.submit(0, time.sleep, 600)\n"
        "print(json.dumps(pool.pids()), flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    pids = json.loads(proc.stdout.readline())
    assert len(pids) == 2
    proc.kill()
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie has exited


def _env(name: str) -> str | None:
    return os.environ.get(name)


def test_each_worker_is_pinned_to_one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # compare --jobs K on a machine with GPUs: worker i sees GPU i (round robin when K > GPUs);
    # checked through the environment each spawned worker really starts with
    from reslab.study.compare import _gpu_env
    from reslab.study.grid import Grid

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    grid = Grid(models=["resnet8"], techniques=["baseline"], seeds=[0], train={})
    env_for = _gpu_env(grid, 3)
    assert env_for is not None
    assert [env_for(i) for i in range(3)] == [{"CUDA_VISIBLE_DEVICES": g} for g in ("3", "5", "3")]
    assert _gpu_env(Grid(models=["resnet8"], techniques=["baseline"], seeds=[0], train={"device": "cpu"}), 3) is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert _gpu_env(grid, 3) is None  # no GPU visible: nothing to pin
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    with WorkerPool(3, env_for=env_for) as pool:
        for i in range(3):
            pool.submit(i, _env, "CUDA_VISIBLE_DEVICES")
        seen = []
        while pool.running():
            seen += [d.value for d in pool.wait(timeout=HANG_S)]
    seen.sort()
    assert seen == ["3", "3", "5"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3,5"  # the parent's own environment is unchanged
