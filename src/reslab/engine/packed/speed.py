"""How fast a pack trains, and which route a pack takes on a GPU: the faster one, measured.

Both routes of a pack (:mod:`.stack`) compute the same thing; which is faster depends on the
card, the model and the pack's size. On the CPU the grouped route was the faster in every
configuration measured (benchmarks/README.md, "Packed training"), so a pack takes the first
correct route there without measuring. On a GPU, :func:`pick_route` times a few packed steps
of each correct route (:func:`packed_rate`) and takes the faster; the result is kept for the
process, so a grid's later packs of the same settings do not measure again.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from reslab.caches import cache_key, new_cache
from reslab.engine.config import TrainConfig
from reslab.engine.devices import synchronize

#: timed packed steps per measurement (after one warm-up step)
PROBE_STEPS = 3

#: fastest_route's answers, by settings, device, pack size and routes
_RATES_MEASURED: dict[str, tuple[str, dict[str, float]]] = new_cache("packing.rates_measured")


def packed_rate(cfg: TrainConfig, ds: Any, device: torch.device, k: int, route: str) -> float:
    """Images per second of ``k`` runs trained as one pack by ``route`` on ``device`` (random
    images of the dataset's shape, the runs' batch size and precision), over
    :data:`PROBE_STEPS` steps."""
    from reslab.engine.build import autocast_for, build_run_model, resolve_config
    from reslab.engine.packed.stack import PackedModel

    # one process; the members' own layout does not matter, the pack picks its own, as train_pack does
    cfg = dataclasses.replace(resolve_config(cfg, ds, device), channels_last=False)
    autocast = autocast_for(cfg, device)
    state = torch.random.get_rng_state()
    try:
        models, opts = [], []
        for _ in range(k):
            m, _ = build_run_model(cfg, ds, load_init_weights=False)
            m = m.to(device)
            models.append(m)
            opts.append(torch.optim.SGD(m.parameters(), lr=cfg.lr))
        pack = PackedModel(
            models, opts, cfg.weight_decay, cfg.momentum, cfg.nesterov, cfg.lr, route, device.type == "cuda"
        )
        c, h, w = ds.input_size
        x = torch.randn(k, cfg.batch_size, c, h, w, device=device)
        y = torch.randint(0, ds.num_classes, (k, cfg.batch_size), device=device)

        def step() -> None:
            with autocast():
                losses, _ = pack.train_losses(x, y, 0.0)
            losses.sum().backward()
            pack.step()
            pack.optimizer.zero_grad(set_to_none=True)

        step()  # warm-up: kernel selection and allocation
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(PROBE_STEPS):
            step()
        synchronize(device)
        return k * cfg.batch_size * PROBE_STEPS / (time.perf_counter() - t0)
    finally:
        torch.random.set_rng_state(state)


def pick_route(
    routes: Sequence[str], device: torch.device, k: int, measure: Callable[[str], float]
) -> tuple[str, dict[str, float]]:
    """The route a pack of ``k`` takes among the correct ``routes`` (in order of preference),
    and the throughputs measured to choose it (empty when nothing was measured): the only
    one; the first on the CPU or for a pack of one; on a GPU the faster by ``measure``.

    A route whose measurement runs out of memory is left out (it has no rate), so a pack
    that fits by one route is not lost to the other; when none fits, the error is raised."""
    if not routes:
        raise ValueError("no route to choose from")
    if len(routes) == 1 or device.type != "cuda" or k < 2:
        return routes[0], {}
    rates: dict[str, float] = {}
    out_of_memory: torch.OutOfMemoryError | None = None
    for r in routes:
        try:
            rates[r] = measure(r)
        except torch.OutOfMemoryError as e:
            out_of_memory = e
        finally:
            torch.cuda.empty_cache()  # what a route held is not in the next one's way
    if not rates and out_of_memory is not None:
        raise out_of_memory
    return max(rates, key=lambda r: rates[r]), rates


def fastest_route(
    cfg: TrainConfig, ds: Any, device: torch.device, k: int, routes: Sequence[str]
) -> tuple[str, dict[str, float]]:
    """:func:`pick_route` measured by :func:`packed_rate`, once per process for these settings."""
    settings = {n: v for n, v in cfg.to_dict().items() if n not in ("seed", "pack")}
    key = cache_key([settings, str(device), k, list(routes)])
    if key not in _RATES_MEASURED:
        _RATES_MEASURED[key] = pick_route(routes, device, k, lambda r: packed_rate(cfg, ds, device, k, r))
    return _RATES_MEASURED[key]


__all__ = ["PROBE_STEPS", "fastest_route", "packed_rate", "pick_route"]
