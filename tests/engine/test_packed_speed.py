"""Which route a pack takes where both are correct: the first on the CPU (the grouped route
measured faster there in every configuration), the faster by measurement on a GPU, measured
once per process for the same settings."""

from __future__ import annotations

import pytest
import torch

from reslab.engine.build import open_run_dataset
from reslab.engine.packed import speed
from reslab.engine.packed.check import pack_routes

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_a_gpu_takes_the_faster_route_and_the_cpu_the_first() -> None:
    rates = {"grouped": 900.0, "vmap": 1200.0}
    asked: list[str] = []

    def measure(route: str) -> float:
        asked.append(route)
        return rates[route]

    assert speed.pick_route(["grouped", "vmap"], CUDA, 8, measure) == ("vmap", rates)
    assert asked == ["grouped", "vmap"]
    rates["grouped"] = 2000.0
    assert speed.pick_route(["grouped", "vmap"], CUDA, 8, measure)[0] == "grouped"
    asked.clear()
    # nothing to choose, or nothing worth measuring: no measurement at all
    assert speed.pick_route(["grouped", "vmap"], CPU, 8, measure) == ("grouped", {})
    assert speed.pick_route(["vmap"], CUDA, 8, measure) == ("vmap", {})
    assert speed.pick_route(["grouped", "vmap"], CUDA, 1, measure) == ("grouped", {})
    assert asked == []
    with pytest.raises(ValueError):
        speed.pick_route([], CUDA, 8, measure)


def test_a_route_that_runs_out_of_memory_is_left_out() -> None:
    def measure(route: str) -> float:
        if route in fits:
            return fits[route]
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    fits = {"grouped": 900.0}  # e.g. a large pack by vmap, which keeps more activations for backward
    assert speed.pick_route(["grouped", "vmap"], CUDA, 16, measure) == ("grouped", {"grouped": 900.0})
    fits = {"vmap": 500.0}
    assert speed.pick_route(["grouped", "vmap"], CUDA, 16, measure) == ("vmap", {"vmap": 500.0})
    fits = {}  # fits by no route: the pack's caller sees the error (auto packing then stops growing)
    with pytest.raises(torch.OutOfMemoryError):
        speed.pick_route(["grouped", "vmap"], CUDA, 16, measure)


def test_a_process_measures_the_same_settings_once(
    tiny_train_config, monkeypatch: pytest.MonkeyPatch, cold_cache
) -> None:
    calls: list[tuple[int, str]] = []

    def fake_rate(cfg, ds, device, k, route):
        calls.append((k, route))
        return {"grouped": 3.0, "vmap": 2.0}[route]

    monkeypatch.setattr(speed, "packed_rate", fake_rate)
    cold_cache("packing.rates_measured")
    cfg = tiny_train_config()
    ds = open_run_dataset(cfg)
    for seed in (0, 1, 2):  # another seed is the same pack's settings
        assert speed.fastest_route(tiny_train_config(seed=seed), ds, CUDA, 4, ["grouped", "vmap"])[0] == "grouped"
    assert calls == [(4, "grouped"), (4, "vmap")]
    speed.fastest_route(tiny_train_config(lr=0.05), ds, CUDA, 4, ["grouped", "vmap"])
    speed.fastest_route(cfg, ds, CUDA, 8, ["grouped", "vmap"])
    assert len(calls) == 6  # other settings, another pack size: measured again


def test_both_routes_are_correct_for_the_built_ins(tiny_train_config) -> None:
    cfg = tiny_train_config(technique="fusion")
    assert pack_routes(cfg, open_run_dataset(cfg)) == (["grouped", "vmap"], "")
    assert pack_routes(cfg, open_run_dataset(cfg), first_only=True) == (["grouped"], "")


def test_the_rate_of_a_pack_is_measured_by_either_route(tiny_train_config) -> None:
    cfg = tiny_train_config()
    ds = open_run_dataset(cfg)
    for route in ("grouped", "vmap"):
        assert speed.packed_rate(cfg, ds, CPU, 2, route) > 0


def test_a_process_checks_the_routes_of_the_same_settings_once(tiny_train_config, monkeypatch, cold_cache) -> None:
    from reslab.engine.packed import check

    calls = []
    real = check._check_routes
    cold_cache("packing.routes_checked")
    monkeypatch.setattr(check, "_check_routes", lambda *a: calls.append(a) or real(*a))
    cfg = tiny_train_config(technique="scale")
    ds = open_run_dataset(cfg)
    for seed in (0, 1, 2):  # the seeds of a pack, a probe and the pack itself: one check
        assert pack_routes(tiny_train_config(technique="scale", seed=seed), ds) == (["grouped", "vmap"], "")
    assert len(calls) == 1
    pack_routes(tiny_train_config(technique="norm"), ds)
    pack_routes(cfg, ds, first_only=True)
    assert len(calls) == 3  # another technique, another question: checked
