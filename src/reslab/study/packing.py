"""How many runs one ``compare`` process trains as one packed model (``--pack K|auto``).

A pack holds runs of one model and technique that differ only in their seed
(:mod:`reslab.engine.packed`), so it is never larger than the seeds a grid needs at once:
all of them for fixed seeds, the first look's for a sequential grid (later looks add
``step`` seeds each). Packing changes where a run trains, never what it computes: the
results are the runs trained alone, to rounding, and the sequential plan and its error rate
are the same with or without packs.

``auto`` is 1 on the CPU, where packing measured 0.84-1.4x and is not worth its memory. On a
GPU it is the largest pack, in powers of two up to the seeds needed at once, that still
speeds training up by at least :data:`AUTO_GAIN` per doubling in a short probe of packed
steps on the grid's own device (and fits in its memory).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from reslab.engine.config import TrainConfig
from reslab.engine.packed import speed
from reslab.engine.packed.check import pack_routes
from reslab.engine.packed.graphed import pack_graphs_refusal
from reslab.errors import UsageError
from reslab.study.grid import Grid

#: a doubling of the pack must raise throughput by at least this factor to be taken
AUTO_GAIN = 1.15


def parse_pack(text: str | int | None) -> int | str:
    """``--pack``: a positive integer or ``auto`` (the default, None); anything else is a
    :class:`UsageError`."""
    if text is None:
        return "auto"
    if isinstance(text, int):
        value = text
    elif str(text).strip().lower() == "auto":
        return "auto"
    else:
        try:
            value = int(str(text))
        except ValueError:
            raise UsageError(f"--pack must be a positive number of runs or 'auto', got {text!r}") from None
    if value < 1:
        raise UsageError(f"--pack must be at least 1, got {value}")
    return value


def seeds_at_once(grid: Grid) -> int:
    """The most seeds of one model and technique the grid needs at the same time."""
    plan = grid.plan()
    return min(plan.min_seeds, len(grid.seeds)) if plan else len(grid.seeds)


def refusal(cfg: TrainConfig, device: torch.device | None = None) -> str:
    """Why runs with these settings cannot train packed ("" when they can). With
    ``cuda_graphs`` a pack replays its step as a CUDA graph, which needs a CUDA device:
    ``device``, or the config's own where it names one (``auto`` is decided where it runs)."""
    if cfg.compile:
        return "a pack does not torch.compile its model (drop compile)"
    if cfg.probe_every:
        return "the gradient-norm probe is not recorded in a pack (--probe-every 0, or --set probe_every=0)"
    if device is None and cfg.device != "auto":
        device = torch.device(cfg.device)
    if cfg.cuda_graphs and device is not None and (why := pack_graphs_refusal(device, False, False, 0)):
        return f"cuda_graphs: {why} (drop cuda_graphs)"
    return ""


def check_pack_option(grid: Grid, pack: int | str, device: torch.device | None = None) -> None:
    """A :class:`UsageError` when ``--pack K`` (K > 1) asks for packs these settings cannot
    train (on ``device`` where it is known): said before any work starts, not after the
    measurements."""
    if pack not in (1, "auto") and (why := refusal(grid.config(grid.cells()[0]), device)):
        raise UsageError(f"--pack {pack}: {why}; or leave --pack out to train every run alone")


class PackChoice(NamedTuple):
    """What :func:`resolve_pack` settled on."""

    #: runs per packed model
    size: int
    #: a line saying why the size is not what was asked ("" when it is)
    note: str
    #: per model: throughput of a pack of ``size`` over one run alone, measured by a probe of
    #: packed steps on a GPU (empty where nothing was measured: the CPU, or packs of 1); the
    #: time estimate divides a run's time by it
    gain: dict[str, float]


def resolve_pack(grid: Grid, pack: int | str, device: torch.device, ds: Any) -> PackChoice:
    """The pack size this process uses, why when it is not what was asked, and its measured
    gain. An explicit size the settings cannot pack is a :class:`UsageError`."""
    at_once = seeds_at_once(grid)
    if pack == 1:
        return PackChoice(1, "", {})
    if pack == "auto":
        if device.type == "cpu" or at_once == 1:
            return PackChoice(1, "", {})
        cfg = grid.config(grid.cells()[0])
        if why := refusal(cfg, device):
            return PackChoice(1, f"compare: --pack auto: {why}, so every run trains alone", {})
        k, gain = choose_pack(cfg, ds, device, at_once)
        gains = pack_gains(grid, ds, device, k, {cfg.model: gain})
        return PackChoice(k, f"compare: --pack auto chose packs of {k} runs on {device} ({gain_words(gains)})", gains)
    check_pack_option(grid, pack, device)
    k, note = int(pack), ""
    if k > at_once:
        k, note = (
            at_once,
            (
                f"compare: --pack {k}: a pack holds seeds of one model and technique, and this grid needs at most "
                f"{at_once} at once, so packs hold {at_once} runs"
            ),
        )
    # what the estimate divides by, measured on a GPU (on the CPU packing is near 1x)
    gains = pack_gains(grid, ds, device, k, {}) if k > 1 and device.type == "cuda" else {}
    return PackChoice(k, note, gains)


def gain_words(gains: dict[str, float]) -> str:
    """The measured pack gains in a few words: "throughput x resnet20 2.0x, resnet56 2.8x"."""
    return "throughput x " + ", ".join(f"{m} {g:.1f}x" for m, g in gains.items())


def pack_gains(grid: Grid, ds: Any, device: torch.device, k: int, known: dict[str, float]) -> dict[str, float]:
    """Per model of the grid: the throughput of a pack of ``k`` over one run alone (the
    probe of :func:`packed_rate`, on baseline's settings), beside the ones ``known``."""
    gains = dict(known)
    for cell in grid.cells():
        if cell.model not in gains:
            cfg = grid.config(cell)
            gains[cell.model] = packed_rate(cfg, ds, device, k) / packed_rate(cfg, ds, device, 1)
    return gains


def choose_pack(cfg: TrainConfig, ds: Any, device: torch.device, max_k: int) -> tuple[int, float]:
    """The largest pack size (1, 2, 4, ... and ``max_k``) whose packed training steps on
    ``device`` run at least :data:`AUTO_GAIN` times the throughput of the size before it,
    stopping at the first size that does not, or that runs out of memory; with its throughput
    over one run's."""
    sizes = sorted(({1 << i for i in range(1, max_k.bit_length())} | {max_k}) - {1})
    one = packed_rate(cfg, ds, device, 1)
    best_k, best_rate = 1, one
    for k in sizes:
        try:
            rate = packed_rate(cfg, ds, device, k)
        except torch.OutOfMemoryError:
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if rate < AUTO_GAIN * best_rate:
            break
        best_k, best_rate = k, rate
    return best_k, best_rate / one


def packed_rate(cfg: TrainConfig, ds: Any, device: torch.device, k: int, route: str | None = None) -> float:
    """Images per second of ``k`` runs trained as one pack on ``device``
    (:func:`reslab.engine.packed.speed.packed_rate`), by ``route``, or by the route
    ``train_pack`` would take (on a GPU the faster correct one, measured)."""
    if route is not None:
        return speed.packed_rate(cfg, ds, device, k, route)
    routes = pack_routes(cfg, ds, first_only=device.type != "cuda")[0] or ["vmap"]
    chosen, rates = speed.fastest_route(cfg, ds, device, k, routes)
    return rates[chosen] if rates else speed.packed_rate(cfg, ds, device, k, chosen)


__all__ = [
    "AUTO_GAIN",
    "PackChoice",
    "check_pack_option",
    "choose_pack",
    "gain_words",
    "pack_gains",
    "packed_rate",
    "parse_pack",
    "refusal",
    "resolve_pack",
    "seeds_at_once",
]
