"""Helpers shared by the tests that run real (tiny) ``reslab compare`` grids: the command line
of a tiny grid, waiting for a background grid to reach a state, and a run's training starts."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from patience import HANG_S
from reslab.study.results import STARTS_FILE


def tiny_args(
    out: Path,
    *extra: str,
    techniques: str = "baseline,scale",
    seeds: str = "2",
    epochs: int = 1,
    subset: int = 512,
    val_size: int = 256,
    test_subset: int | None = None,
    probe: bool = False,
    quiet: bool = True,
) -> list[str]:
    """``compare`` arguments for resnet8 at quarter width on a few hundred real images: about a
    second of compute per run, enough to exercise the grid machinery, not accuracy."""
    return [
        "compare",
        "--models",
        "resnet8",
        "--width",
        "0.25",
        "--train-subset",
        str(subset),
        "--val-size",
        str(val_size),
        *(("--test-subset", str(test_subset)) if test_subset else ()),
        "--batch-size",
        "64",
        "--target-acc",
        "0.2",
        *(("--quiet",) if quiet else ()),
        *(() if probe else ("--no-probe",)),
        "--techniques",
        techniques,
        "--seeds",
        seeds,
        "--epochs",
        str(epochs),
        "--out",
        str(out),
        *extra,
    ]


def wait_for(pred: Callable[[], bool], proc: subprocess.Popen, timeout: float = HANG_S) -> None:
    """Poll ``pred`` until true; fail if ``proc`` exits first or the time runs out."""
    t0 = time.monotonic()
    while not pred():
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"compare exited early ({proc.returncode}): {err}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the grid")
        time.sleep(0.02)


def run_starts(run: Path) -> list[dict]:
    """A run folder's training starts (one line per start, written under the cell's claim)."""
    return [json.loads(x) for x in (run / STARTS_FILE).read_text().splitlines()]
