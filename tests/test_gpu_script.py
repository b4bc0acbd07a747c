"""``benchmarks/gpu.sh`` stays ready for the next GPU machine.

A GPU is lent only now and then, for minutes, and the script runs once in one call: an option
renamed since it was last run would waste that call. ``LIST=FILE`` makes the script write each
step's command instead of running it; here every command is parsed by the parser of the
program it calls, as on the GPU, and compare's grids are built.
"""

from __future__ import annotations

import argparse
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.sh"


def _steps(tmp_path: Path) -> dict[str, list[str]]:
    listing = tmp_path / "steps"
    env = {**os.environ, "LIST": str(listing), "PYTHON": sys.executable}
    subprocess.run(["bash", str(SCRIPT)], env=env, check=True, capture_output=True, timeout=60, cwd=tmp_path)
    steps = {}
    for line in listing.read_bytes().split(b"\n"):
        if line:
            name, *argv = line.decode().rstrip("\0").split("\0")
            steps[name] = argv
    return steps


class _Parsed(Exception):
    pass


def _parse_benchmark(path: Path, args: list[str]) -> argparse.Namespace:
    """The namespace the benchmark's own ``main()`` parses from ``args``; nothing runs after it."""
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    module = runpy.run_path(str(path), run_name="gpu_sh_check")
    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop), pytest.raises(_Parsed) as e:
        with mock.patch.object(sys, "argv", [str(path), *args]):
            module["main"]()
    return e.value.args[0]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_every_step_of_gpu_sh_is_accepted_by_its_program(tmp_path):
    from reslab.cli import build_parser
    from reslab.cli.commands.compare import build_grid
    from reslab.study.presets import parse_duration

    steps = _steps(tmp_path)
    # the steps the acceptance needs, each present
    needed = (
        "cuda-tests",
        "pack-speed",
        "pack-startup",
        "train-speed-graphs",
        "technique-overhead",
        "paper-estimate",
        "deep-study",
        "evidence",
    )
    for name in needed:
        assert name in steps, f"gpu.sh no longer runs {name}"
    deep = steps["deep-study"]  # the evidence: resnet56, full width, all images, >= 5 epochs, >= 3 seeds
    grid, _, _ = build_grid(build_parser(deep[3:]).parse_args(deep[3:]))
    config = grid.config(grid.cells()[0])
    assert (config.model, config.width, config.train_subset) == ("resnet56", 1.0, None)
    assert config.epochs >= 5 and len({c.seed for c in grid.cells()}) >= 3
    for name, argv in steps.items():
        assert argv[0] == sys.executable, name
        if argv[1:3] == ["-m", "pytest"]:
            assert argv[argv.index("-m", 2) + 1] == "cuda", name
            continue
        if argv[1:3] == ["-m", "reslab"]:
            args = build_parser(argv[3:]).parse_args(argv[3:])
            if args.command == "evidence":  # one call of the evidence study, on the card, within the script's budget
                assert args.device == "cuda" and args.out == "docs/evidence", name
                assert 60 <= parse_duration(args.budget) <= 480 and not (args.plan or args.no_train), name
                continue
            assert args.command == "compare", name
            grid, _, _ = build_grid(args)
            config = grid.config(grid.cells()[0])  # the training settings are valid
            assert config.device == "cuda", f"{name} would not train on the GPU"
            continue
        path = ROOT / argv[1]
        assert path.parent.name == "benchmarks" and path.is_file(), name
        ns = _parse_benchmark(path, argv[2:])
        assert ns.device == "cuda", f"{name} would not measure the GPU"
        if name in ("pack-speed", "pack-startup"):  # the sizes the issues' targets are about
            assert {"resnet56:16:512", "resnet20:32:128"} <= set(ns.configs.split(",")), ns.configs
        if name == "pack-speed":  # issue 29: packed and graphed, beside one run at a time and the eager pack
            assert ns.graphs and ns.rounds > 0, name
        if name == "pack-startup":  # issue 29: train_pack's start-up with cuda_graphs
            assert ns.train_pack_startup, name
