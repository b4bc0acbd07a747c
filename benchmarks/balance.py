"""Wall time of each worker when several ``reslab compare`` processes share one grid of unequal models.

    python benchmarks/balance.py                 # resnet8 + resnet44, 3 techniques x 3 seeds, 2 workers

Two worker processes, each pinned to its own core (one thread each), train the same grid
into one results folder, in two ways, one after the other:

* ``claims``: both run the same command; each claims the next unclaimed cell (the costliest
  model first within a seed) until the grid is done;
* ``shards``: ``--shard 1/2`` and ``--shard 2/2``, parts balanced by the estimated cost of
  each cell (largest first, to the lighter part).

For the old round-robin shards (every 2nd cell), the wall time each worker would have had
is the sum of the measured cell times of its cells, taken from the ``claims`` run.

Before the timed runs, one invocation with a 1-millisecond budget writes the grid and its
timing pass (``timing.json``), which each timed folder starts from: so no worker spends
its time on the shared one-off measurement while the other trains.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def grid_args(out: Path, models: str, seeds: int, subset: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "reslab",
        "compare",
        "--models",
        models,
        "--techniques",
        "baseline,scale,norm",
        "--seeds",
        str(seeds),
        "--width",
        "0.25",
        "--epochs",
        "1",
        "--train-subset",
        str(subset),
        "--val-size",
        "256",
        "--test-subset",
        "512",
        "--no-probe",
        "--no-report",
        "--quiet",
        "--jobs",
        "1",
        "--out",
        str(out),
    ]


def pinned(cpu: int):  # a preexec_fn
    return lambda: os.sched_setaffinity(0, {cpu})


def run_workers(commands: list[list[str]], cpus: list[int]) -> tuple[list[float], float]:
    """Start every command at once, each pinned to its core; the wall time of each, and the
    start time (epoch seconds)."""
    start = time.time()
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, preexec_fn=pinned(cpu)) for c, cpu in zip(commands, cpus, strict=True)]
    walls = [0.0] * len(procs)
    left = set(range(len(procs)))
    while left:
        for i in list(left):
            if procs[i].poll() is not None:
                if procs[i].returncode != 0:
                    raise SystemExit(f"worker {i} exited with {procs[i].returncode}")
                walls[i] = time.perf_counter() - t0
                left.discard(i)
        time.sleep(0.05)
    return walls, start


def timelines(out: Path, start: float) -> list[tuple[float, float, float]]:
    """Per worker process: (seconds to its first training start, seconds between its cells'
    starts and ends, seconds between its cells), from starts.jsonl and summary.json."""
    spans: dict[int, list[tuple[float, float]]] = {}
    for d in (out / "runs").iterdir():
        first = json.loads((d / "starts.jsonl").read_text().splitlines()[0])
        spans.setdefault(first["pid"], []).append((first["time"], (d / "summary.json").stat().st_mtime))
    rows = []
    for pid in sorted(spans):
        s = sorted(spans[pid])
        busy = sum(b - a for a, b in s)
        gaps = sum(s[i + 1][0] - s[i][1] for i in range(len(s) - 1))
        rows.append((s[0][0] - start, busy, gaps))
    return rows


def cell_times(out: Path) -> dict[str, float]:
    return {
        d.name: float(json.loads((d / "summary.json").read_text())["elapsed_s"])
        for d in sorted((out / "runs").iterdir())
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet8,resnet44")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train-subset", type=int, default=2048, help="training images per run (sets a run's length)")
    args = p.parse_args()
    cpus = sorted(os.sched_getaffinity(0))[:2]
    if len(cpus) < 2:
        raise SystemExit("balance.py needs 2 cores")
    with tempfile.TemporaryDirectory() as tmp:
        seed_dir = Path(tmp) / "seed"
        subprocess.run(
            [*grid_args(seed_dir, args.models, args.seeds, args.train_subset), "--budget", "0.001s"], check=True
        )
        for name in list((seed_dir / "runs").glob("*")) if (seed_dir / "runs").exists() else []:
            shutil.rmtree(name)
        result: dict[str, list[float]] = {}
        detail: dict[str, list[tuple[float, float, float]]] = {}
        for mode in ("claims", "shards"):
            out = Path(tmp) / mode
            shutil.copytree(seed_dir, out)
            base = grid_args(out, args.models, args.seeds, args.train_subset)
            cmds = [base, base] if mode == "claims" else [[*base, "--shard", f"{i}/2"] for i in (1, 2)]
            result[mode], start = run_workers(cmds, cpus)
            detail[mode] = timelines(out, start)
            if mode == "claims":
                times = cell_times(out)
                names = list(times)
        # round robin over the grid's cell order (seed-major), from the measured cell times
        grid = json.loads((seed_dir / "grid.json").read_text())
        order = [f"{m}-{t}-s{s}" for s in grid["seeds"] for m in grid["models"] for t in grid["techniques"]]
        assert sorted(order) == sorted(names)
        rr = [sum(times[c] for k, c in enumerate(order) if k % 2 == i) for i in (0, 1)]
    load = os.getloadavg()[0]
    print(f"\n{args.models}, {len(order)} cells, 2 workers pinned to cores {cpus}, load average at the end {load:.2f}")
    print(f"{'mode':<28} {'worker 1 s':>10} {'worker 2 s':>10} {'longest / shortest':>19}")
    for mode, walls in result.items():
        print(f"{mode + ' (measured)':<28} {walls[0]:>10.1f} {walls[1]:>10.1f} {max(walls) / min(walls):>18.2f}x")
    print(f"{'round robin (cell sums)':<28} {rr[0]:>10.1f} {rr[1]:>10.1f} {max(rr) / min(rr):>18.2f}x")
    for mode, rows in detail.items():
        print(
            f"{mode}: per worker, start-up to its first run / in runs / between runs (s): "
            + "; ".join(f"{a:.1f} / {b:.1f} / {c:.1f}" for a, b, c in rows)
        )
    print(
        f"sum of cell times: {sum(times.values()):.1f} s; a worker's wall time also holds its start-up "
        "(Python, torch, reading the dataset), the same for every mode"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
