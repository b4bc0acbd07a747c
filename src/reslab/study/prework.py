"""Measurements a grid takes once before training, each claimed so that one worker does it:
the gradient-flow probe at initialisation and the interleaved step-time pass. Also the
dataset check that precedes them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from reslab.engine.timing import measure_step_times
from reslab.errors import UsageError
from reslab.probe.records import read_probe_data, write_probe_file
from reslab.study.claims import Claims, describe
from reslab.study.grid import Grid
from reslab.study.gridfile import read_timing_file, write_timing
from reslab.study.results import (
    PROBE_FILE,
)
from reslab.study.scheduler import GridProgress

#: depths the init probe always covers besides the grid's models: where the article's claims
#: about depth are decided, however shallow the grid's own models are
PROBE_DEPTHS = (56, 110)


def probe_targets(grid: Grid) -> list[tuple[int, float]]:
    """(depth, width) pairs the init probe covers: the grid's CIFAR-style models and
    :data:`PROBE_DEPTHS`, all at the grid's width (gradient growth with depth shows at any width;
    at width 0.25 a depth-110 probe costs a sixteenth of width 1's)."""
    width = float(grid.shared_settings()["width"])
    depths = [d for m in grid.models if (d := cifar_depth(m)) is not None]
    return [(d, width) for d in sorted({*depths, *PROBE_DEPTHS})]


def cifar_depth(model: str) -> int | None:
    from reslab.nn.models import model_family

    try:
        if model_family(model) != "cifar":
            return None
    except ValueError:
        return None
    return int(model.removeprefix("resnet"))


def probe_at_init(grid: Grid, results: Path, batches: int = 1, batch_size: int = 64) -> Path:
    """Gradient flow at initialisation of every technique at the grid's models and at depths
    56 and 110 (at the grid's width), by :func:`reslab.probe.runner.run_probe` on the device
    the grid trains on, into ``PROBE_FILE`` in the probe's own format (``{"config",
    "results"}``, each result with its ``width``; the config's ``device`` names the device).

    It costs a forward and backward pass per batch and model. Errors are recorded in the
    file rather than stopping the grid, since the training results do not depend on it.
    """
    from reslab.engine.data import ArrayDataset, open_dataset
    from reslab.engine.devices import describe_device, pick_device
    from reslab.probe.records import entry_to_dict
    from reslab.probe.runner import make_batches, run_probe

    settings = grid.shared_settings()
    results_out: list[dict[str, Any]] = []
    config: dict[str, Any] = {"batches": batches, "batch_size": batch_size, "source": "at initialisation"}
    try:
        device = pick_device(str(grid.train.get("device") or "auto"))  # where the grid trains
        config["device"] = describe_device(device)
        ds = open_dataset(settings["dataset"], grid.train.get("data_dir"))
        if not isinstance(ds, ArrayDataset):
            config["error"] = "streamed (folder) datasets are not probed"
        else:
            data = make_batches(ds.train_x, ds.train_y, ds.mean, ds.std, batches, batch_size, seed=0)
            by_width: dict[float, list[int]] = {}
            for d, w in probe_targets(grid):
                by_width.setdefault(w, []).append(d)
            for w, depths in by_width.items():
                entries = run_probe(grid.techniques, depths, data, ds.num_classes, width=w, workers=1, device=device)
                results_out += [{**entry_to_dict(e), "width": w} for e in entries]
    except Exception as e:  # noqa: BLE001 - a failed measurement must not stop the training grid
        config["error"] = f"{type(e).__name__}: {e}"
    path = results / PROBE_FILE
    write_probe_file(path, config, results_out)
    return path


def probe_done(grid: Grid, results: Path) -> bool:
    """Does ``PROBE_FILE`` cover every technique at every target (a failed probe does not)?"""
    have: set[tuple[str, int, float]] = set()
    try:
        old = read_probe_data(results / PROBE_FILE)
        if "error" not in old.get("config", {}):  # a failed probe is tried again
            have = {(e["technique"], int(e["depth"]), float(e["width"])) for e in old["results"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return {(t, d, w) for d, w in probe_targets(grid) for t in grid.techniques} <= have


def claim_once(claims: Claims, name: str, done: Callable[[], bool], prog: GridProgress, what: str) -> Any:
    """The claim on one-off work every worker needs (``what``), or None when it is done; while
    another live worker does it, wait for its result (and take over if that worker dies)."""
    return claims.claim_or_wait(
        name, done, on_wait=lambda h: prog.line(f"compare: waiting for {describe(h)}, which is {what}")
    )


def probe_if_needed(grid: Grid, results: Path, prog: GridProgress, claims: Claims) -> None:
    """Probe at init unless ``PROBE_FILE`` already covers every technique at every target."""
    targets = probe_targets(grid)
    what = f"measuring gradient flow at initialisation at depths {', '.join(str(d) for d, _ in targets)}"
    lease = claim_once(claims, "probe-init", lambda: probe_done(grid, results), prog, what)
    if lease is None:
        return
    with lease.renewed():
        prog.line(f"compare: {what}, width {targets[0][1]:g}")
        probe_at_init(grid, results)


def read_timing(grid: Grid, results: Path) -> dict[str, Any] | None:
    """The stored step-time pass when it covers every model x technique of ``grid`` and was
    measured on the kind of device (CPU or CUDA) the grid trains on here. A file without a
    device record was written when the pass always ran on the CPU."""
    old = read_timing_file(results)
    if isinstance(old.get("steps"), dict) and {f"{m}/{t}" for m in grid.models for t in grid.techniques} <= set(
        old["steps"]
    ):
        return old if _same_device_type(grid, old) else None
    return None


def _same_device_type(grid: Grid, timing: dict[str, Any]) -> bool:
    from reslab.engine.devices import pick_device

    dev = timing.get("device")
    measured = dev.get("type") if isinstance(dev, dict) else "cpu"
    try:
        here = pick_device(str(grid.train.get("device") or "auto")).type
    except (UsageError, RuntimeError):  # no such device here: training says so, not this check
        return True
    return measured == here


def timing_if_needed(
    grid: Grid, results: Path, ds: Any, threads: int, prog: GridProgress, claims: Claims
) -> dict[str, Any]:
    """The dedicated step-time pass (:mod:`reslab.engine.timing`), once per results folder, on
    the device, precision and memory layout the grid's runs use (``threads`` on the CPU)."""
    what = "timing a few training steps of every model x technique, side by side"
    lease = claim_once(claims, "timing", lambda: read_timing(grid, results) is not None, prog, what)
    if lease is None:
        timing = read_timing(grid, results)
        assert timing is not None
        return timing
    settings = grid.shared_settings()
    with lease.renewed():
        prog.line(f"compare: {what}")
        timing = measure_step_times(
            grid.models,
            grid.techniques,
            tuple(ds.input_size),
            ds.num_classes,
            batch_size=int(settings["batch_size"]),
            width=float(settings["width"]),
            technique_args=dict(settings["technique_args"]),
            threads=threads,
            # machine settings, which the grid keeps outside its shared settings
            device=str(grid.train.get("device") or "auto"),
            precision=str(grid.train.get("precision") or "auto"),
            channels_last=bool(grid.train.get("channels_last", True)),
            cuda_graphs=bool(grid.train.get("cuda_graphs", False)),
        )
        write_timing(results, timing)
        dev = timing["device"]
        prog.line(f"compare: timed on {dev['name']} ({dev['type']}), {timing['settings']['precision']}")
    return timing


def check_data(grid: Grid) -> Any:
    """Open the dataset before training (one message, with the fix, when it cannot be found)."""
    from reslab.engine.data import open_dataset

    try:
        return open_dataset(grid.shared_settings()["dataset"], grid.train.get("data_dir"))
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(str(e)) from None
