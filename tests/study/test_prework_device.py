"""The grid's one-off measurements (timing pass, init probe) run on the grid's device and
record it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reslab.study.claims import Claims
from reslab.study.grid import Grid
from reslab.study.gridfile import write_timing
from reslab.study.prework import check_data, probe_at_init, timing_if_needed
from reslab.study.results import PROBE_FILE, TIMING_FILE
from reslab.study.scheduler import GridProgress


def _grid(device: str, **train) -> Grid:
    settings = {"width": 0.25, "batch_size": 8, "device": device, **train}
    return Grid(models=["resnet8"], techniques=["baseline", "scale"], seeds=[0], train=settings)


def _time(grid: Grid, out: Path, threads: int = 1) -> dict:
    out.mkdir()
    return timing_if_needed(grid, out, check_data(grid), threads, GridProgress(False), Claims(out / "claims"))


def test_a_cpu_grid_times_on_the_cpu_with_its_threads(tmp_path: Path) -> None:
    timing = _time(_grid("cpu"), tmp_path / "res", threads=1)
    stored = json.loads((tmp_path / "res" / TIMING_FILE).read_text())
    assert stored == json.loads(json.dumps(timing))
    assert stored["device"]["type"] == "cpu" and stored["device"]["threads"] == 1
    assert stored["settings"]["precision"] == "fp32"  # auto on the CPU
    assert set(stored["steps"]) == {"resnet8/baseline", "resnet8/scale"}


def test_a_grid_asking_for_bf16_times_in_bf16(tmp_path: Path) -> None:
    timing = _time(_grid("cpu", precision="bf16", channels_last=False), tmp_path / "res")
    assert timing["settings"]["precision"] == "bf16" and timing["settings"]["channels_last"] is False


def test_the_init_probe_records_the_grids_device(tmp_path: Path) -> None:
    out = tmp_path / "res"
    out.mkdir()
    grid = Grid(models=["resnet8"], techniques=["baseline"], seeds=[0], train={"width": 0.25, "device": "cpu"})
    probe = json.loads(probe_at_init(grid, out, batch_size=8).read_text())
    assert "error" not in probe["config"], probe["config"]
    assert probe["config"]["device"]["type"] == "cpu"
    assert (out / PROBE_FILE).is_file()


@pytest.mark.cuda
def test_a_cuda_grid_times_and_probes_on_the_gpu(tmp_path: Path) -> None:
    import torch

    timing = _time(_grid("cuda"), tmp_path / "res")
    assert timing["device"]["type"] == "cuda"
    assert timing["device"]["name"] == torch.cuda.get_device_name(timing["device"]["index"])
    assert timing["settings"]["precision"] == "bf16"  # auto on CUDA, as the engine trains
    out = tmp_path / "probe"
    out.mkdir()
    grid = Grid(models=["resnet8"], techniques=["baseline"], seeds=[0], train={"width": 0.25, "device": "cuda"})
    probe = json.loads(probe_at_init(grid, out, batch_size=8).read_text())
    assert "error" not in probe["config"] and probe["config"]["device"]["type"] == "cuda"


def test_a_stored_pass_from_another_kind_of_device_is_measured_again(tmp_path: Path) -> None:
    from reslab.study.prework import read_timing

    grid = _grid("cpu")
    out = tmp_path / "res"
    out.mkdir()
    steps = {"resnet8/baseline": [0.01], "resnet8/scale": [0.01]}
    gpu = {"device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}, "steps": steps}
    write_timing(out, gpu)
    assert read_timing(grid, out) is None  # timed on a card, trained on the CPU: timed again
    old = {"settings": {"threads": 2}, "steps": steps}  # before the device was recorded: on the CPU
    write_timing(out, old)
    assert read_timing(grid, out) == old
