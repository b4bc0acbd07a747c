"""``--preset paper --dataset cifar10``: the literature's CIFAR-10 setting (He et al. 2016),
resolved from the preset's recipe, and a grid of it trained end to end on CIFAR-10 files
made up here in torchvision's format (CIFAR cannot be downloaded on the test machines)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cifar_files import as_official, write_cifar
from reslab import caches
from reslab.cli import build_parser, main
from reslab.cli.commands.compare import build_grid
from reslab.engine import data
from reslab.engine.config import TrainConfig
from reslab.engine.optim import lr_at
from reslab.study.packing import refusal, seeds_at_once
from reslab.study.presets import CIFAR10_RECIPE

parse = build_parser().parse_args


def test_the_cifar10_recipe_is_he_et_al_s_setting() -> None:
    grid, _, out = build_grid(parse(["compare", "--preset", "paper", "--dataset", "cifar10"]))
    assert grid.preset == "paper (cifar10)" and out == "results/paper-cifar10"
    assert grid.train == CIFAR10_RECIPE
    cfg = grid.config(grid.cells()[0])
    assert (cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay) == (128, 0.1, 0.9, 1e-4)
    assert (cfg.label_smoothing, cfg.flip, cfg.crop_padding, cfg.val_size) == (0.0, True, 4, 5000)
    # 64k iterations of batch 128 on 45,000 images, lr 0.1 -> 0.01 -> 0.001 at 32k and 48k
    steps = cfg.epochs * -(-45_000 // cfg.batch_size)
    assert abs(steps - 64_000) / 64_000 < 0.005
    assert [lr_at(s, steps, cfg) for s in (1_000, 33_000, 49_000)] == pytest.approx([0.1, 0.01, 0.001])
    # the same study otherwise: the article's techniques at three depths, looks of 3 packable seeds
    assert grid.models == ["resnet20", "resnet56", "resnet110"]
    assert grid.techniques == ["baseline", "scale", "norm", "fusion"]
    assert grid.plan() is not None and grid.plan().looks == (3, 6, 9)
    assert seeds_at_once(grid) == 3 and refusal(cfg) == ""
    # where the files are read from does not change the recipe; a setting does, and is kept
    grid, _, _ = build_grid(parse(["compare", "--preset", "paper", "--dataset", "cifar10", "--data-dir", "/x"]))
    assert grid.preset == "paper (cifar10)"
    grid, _, _ = build_grid(parse(["compare", "--preset", "paper", "--dataset", "cifar10", "--epochs", "30"]))
    assert grid.preset == "paper (modified)" and grid.train == {**CIFAR10_RECIPE, "epochs": 30}
    # a dataset with no recipe keeps the preset's own settings
    grid, _, _ = build_grid(parse(["compare", "--preset", "paper", "--dataset", "digits"]))
    assert grid.train["batch_size"] == 512 and grid.preset == "paper (modified)"


def test_a_cifar10_paper_grid_trains_on_files_in_cifar_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "cifar"
    write_cifar(root, "cifar10", n_train=200, n_test=100, learnable=True)
    monkeypatch.setitem(data.CIFAR, "cifar10", as_official(root, "cifar10"))
    caches.clear("datasets.decoded")
    out = tmp_path / "r"
    shrink = ["epochs=3", "val_size=100", "width=0.25", "batch_size=50", "threads=1"]
    argv = ["compare", "--preset", "paper", "--dataset", "cifar10", "--data-dir", str(root), "--models", "resnet8"]
    argv += ["--techniques", "scale", "--max-seeds", "3", "--no-probe", "--out", str(out), "--quiet"]
    argv += [x for s in shrink for x in ("--set", s)]
    assert main(argv) == 0, capsys.readouterr().err
    runs = sorted(p.parent for p in out.glob("runs/*/config.yaml"))
    assert len(runs) == 6  # baseline and scale, 3 seeds: decided or not, the plan stops at 3
    cfg = TrainConfig.from_dict(yaml.safe_load((runs[0] / "config.yaml").read_text()))
    assert cfg.dataset == "cifar10" and cfg.schedule == "step" and cfg.weight_decay == 1e-4 and not cfg.nesterov
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert (out / "report.md").is_file()
