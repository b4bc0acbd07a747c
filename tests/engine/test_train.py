"""The training engine: run-folder contents, schedules, weight-decay groups, gradient
probes, divergence, interrupts, refusals and config files; tiny runs on real data."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from patience import HANG_S
from reslab.engine.callbacks import block_grad_norms
from reslab.engine.data import load_arrays
from reslab.engine.optim import lr_at, param_groups
from reslab.engine.train import WALL_CLOCK_FIELDS, TrainConfig, raise_if_diverged, train
from reslab.errors import DivergedError, UsageError
from reslab.nn.blocks import residual_blocks
from reslab.nn.models import build_model
from reslab.nn.weights import load_model, read_metadata

pytestmark = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
    reason="needs the fashion-mnist files (apt-get install dataset-fashion-mnist)",
)


def _cli(*args: str, timeout: float = HANG_S) -> subprocess.CompletedProcess:
    env_cmd = [sys.executable, "-m", "reslab", "train", *args]
    return subprocess.run(env_cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _rows(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


# ---------------------------------------------------------------------------------------
# Pieces with closed forms


def test_onecycle_and_cosine_schedules():
    cfg = TrainConfig(lr=0.4, warmup=0.25, schedule="onecycle")
    total = 100
    lrs = [lr_at(s, total, cfg) for s in range(total)]
    assert lrs[0] == pytest.approx(0.4 / 25) and lrs[24] == pytest.approx(0.4)  # linear rise to the peak
    assert lrs[25] == pytest.approx(0.4) and lrs[-1] == pytest.approx(0.4 / 75)  # linear fall towards 0
    assert all(a >= b for a, b in itertools.pairwise(lrs[24:]))
    cos = TrainConfig(lr=0.4, warmup=0.0, schedule="cosine")
    assert lr_at(50, 100, cos) == pytest.approx(0.2)  # half way down a half cosine
    assert lr_at(25, 100, cos) == pytest.approx(0.2 * (1 + math.cos(math.pi / 4)))
    assert lr_at(70, 100, TrainConfig(lr=0.3, warmup=0.0, schedule="constant")) == 0.3


def test_step_schedule_is_he_et_al_s_cifar_schedule():
    """He et al. 2016: lr 0.1, divided by 10 at 32k and 48k of 64k iterations."""
    cfg = TrainConfig(lr=0.1, warmup=0.0, schedule="step")
    total = 64_000
    assert lr_at(0, total, cfg) == lr_at(31_999, total, cfg) == 0.1
    assert lr_at(32_000, total, cfg) == pytest.approx(0.01) and lr_at(47_999, total, cfg) == pytest.approx(0.01)
    assert lr_at(48_000, total, cfg) == pytest.approx(0.001) and lr_at(63_999, total, cfg) == pytest.approx(0.001)
    warm = TrainConfig(lr=0.1, warmup=0.01, schedule="step")
    assert lr_at(0, total, warm) == pytest.approx(0.1 / 640) and lr_at(639, total, warm) == pytest.approx(0.1)
    assert lr_at(640, total, warm) == 0.1 and lr_at(32_000, total, warm) == pytest.approx(0.01)


@pytest.mark.parametrize("technique", ["baseline", "scale", "skipinit", "layerscale", "fixup", "norm", "fusion"])
def test_weight_decay_only_on_conv_and_linear_weights(technique):
    model = build_model("resnet8", technique=technique, in_channels=1, width=0.25)
    decay, no_decay = param_groups(model, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    # resnet8 written out: the stem conv, two convs in each stage's one block, a projection
    # conv where stages 2 and 3 halve the size, the classifier; fusion adds its 1x1 mixing conv.
    expected = {"conv1.weight", "fc.weight"}
    expected |= {f"layer{s}.0.conv{c}.weight" for s in (1, 2, 3) for c in (1, 2)}
    expected |= {f"layer{s}.0.downsample.0.weight" for s in (2, 3)}
    if technique == "fusion":
        expected |= {f"layer{s}.0.feature_fusion.weight" for s in (1, 2, 3)}
    assert decayed == expected
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    # technique scalars (scale, alpha, gamma, fixup biases) and BN are never decayed
    for n in names.values():
        if n.split(".")[-1] in ("scale", "alpha", "gamma", "bias") or ".bn" in n:
            assert n not in decayed


def test_block_grad_norms_match_the_formula():
    torch.manual_seed(0)
    model = build_model("resnet8", in_channels=1, width=0.25)
    model(torch.randn(4, 1, 12, 12)).square().mean().backward()
    blocks = residual_blocks(model)
    got = block_grad_norms(blocks)
    for (_, b), g in zip(blocks, got, strict=True):
        ref = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in b.parameters()))
        assert g == pytest.approx(ref, rel=1e-5)


# ---------------------------------------------------------------------------------------
# A real run and its folder


def test_run_folder_contents_and_test_accuracy(tmp_path, tiny_train_config):
    cfg = tiny_train_config(probe_every=3, tensorboard=True)
    out = tmp_path / "run"
    summary = train(cfg, out, progress=False)
    assert summary["status"] == "completed"
    assert json.loads((out / "summary.json").read_text()) == summary
    for key in ("test_acc", "best_val_acc", "best_epoch", "epochs", "elapsed_s", "params", "flops", "test_loss"):
        assert summary[key] is not None, key
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert set(r) >= {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", *WALL_CLOCK_FIELDS}
    assert summary["best_val_acc"] == max(r["val_acc"] for r in rows)
    saved = TrainConfig.from_dict(__import__("yaml").safe_load((out / "config.yaml").read_text()))
    assert saved.val_size == 200 and saved.device == "cpu" and saved.flip is True

    # the saved weights rebuild the model; its accuracy on the real test set, computed
    # here independently, is the summary's
    meta = read_metadata(out / "model.safetensors")
    assert meta["input_size"] == [1, 28, 28] and meta["dataset"] == "fashion-mnist" and len(meta["classes"]) == 10
    model = load_model(out / "model.safetensors").eval()
    ds = load_arrays("fashion-mnist")
    x = (ds.test_x.float() / 255 - meta["mean"][0]) / meta["std"][0]
    with torch.no_grad():
        logits = torch.cat([model(x[i : i + 1000]) for i in range(0, len(x), 1000)])
    acc = (logits.argmax(1) == ds.test_y).double().mean().item()
    loss = F.cross_entropy(logits, ds.test_y).item()
    assert summary["test_acc"] == pytest.approx(acc, abs=1e-4)
    assert summary["test_loss"] == pytest.approx(loss, rel=1e-3)
    assert summary["params"] == sum(p.numel() for p in model.parameters())

    # gradient probe: one record per 3 optimizer steps, keys step, epoch and every block
    grads = _rows(out, "gradients.jsonl")
    steps_per_epoch = 256 // 64
    assert [g["step"] for g in grads] == list(range(3, 2 * steps_per_epoch + 1, 3))
    assert [g["epoch"] for g in grads] == [(g["step"] - 1) // steps_per_epoch + 1 for g in grads]
    names = [n for n, _ in residual_blocks(model)]
    assert all(list(g)[2:] == names and all(g[n] > 0 for n in names) for g in grads)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def count_eval_passes(monkeypatch) -> list[str]:
    """The passes over evaluation images (``"val"`` or ``"test"``) of every in-memory run, in order."""
    from reslab.engine.sources import ArraySource

    passes: list[str] = []
    real = ArraySource.eval_batches

    def counted(self, which, batch):
        passes.append(which)
        return real(self, which, batch)

    monkeypatch.setattr(ArraySource, "eval_batches", counted)
    return passes


@pytest.mark.parametrize(("val_size", "evals_per_epoch"), [(200, 1), (200, 3), (0, 1), (0, 2)])
def test_validation_runs_once_per_epoch(tmp_path, monkeypatch, tiny_train_config, val_size, evals_per_epoch):
    passes = count_eval_passes(monkeypatch)
    out = tmp_path / "r"
    cfg = tiny_train_config(val_size=val_size, evals_per_epoch=evals_per_epoch)
    summary = train(cfg, out, progress=False)
    assert summary["status"] == "completed"
    # each of the 2 epochs validates once at its end and evals_per_epoch - 1 times inside it; the test
    # images get a pass of their own unless they are the validation images (val_size 0): then the last
    # validation was that pass
    assert passes == ["val"] * (2 * evals_per_epoch) + (["test"] if val_size else [])
    if not val_size:
        # the reused figure is the test accuracy, computed here independently from the saved weights
        meta = read_metadata(out / "model.safetensors")
        model = load_model(out / "model.safetensors").eval()
        ds = load_arrays("fashion-mnist")
        x = (ds.test_x.float() / 255 - meta["mean"][0]) / meta["std"][0]
        with torch.no_grad():
            logits = torch.cat([model(x[i : i + 1000]) for i in range(0, len(x), 1000)])
        assert summary["test_acc"] == pytest.approx((logits.argmax(1) == ds.test_y).double().mean().item(), abs=1e-4)
        assert summary["test_acc"] == _rows(out)[-1]["val_acc"]


def test_same_seed_same_weights_other_seed_differs(tmp_path, tiny_train_config):
    a = train(tiny_train_config(epochs=1), tmp_path / "a", progress=False)
    b = train(tiny_train_config(epochs=1), tmp_path / "b", progress=False)
    c = train(tiny_train_config(epochs=1, seed=1), tmp_path / "c", progress=False)
    wa, wb, wc = (load_file(str(tmp_path / n / "model.safetensors")) for n in "abc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert a["test_acc"] == b["test_acc"]
    del c


def test_resume_in_process_equals_uninterrupted(tmp_path, tiny_train_config):
    cfg = tiny_train_config(epochs=3, drop_path_rate=0.1, probe_every=2)
    full = train(cfg, tmp_path / "full", progress=False)

    def stop_after_first(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False, on_epoch=stop_after_first)
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["status"] == "interrupted"
    # another model or technique is refused, naming both
    with pytest.raises(UsageError, match=r"baseline.*scale"):
        train(cfg.replace(technique="scale"), tmp_path / "cut", resume=True, progress=False)
    with pytest.raises(UsageError, match="--resume"):
        train(cfg, tmp_path / "cut", progress=False)
    resumed = train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert resumed["test_acc"] == full["test_acc"]

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in WALL_CLOCK_FIELDS} for r in rows]

    assert strip(_rows(tmp_path / "cut")) == strip(_rows(tmp_path / "full"))
    assert _rows(tmp_path / "cut", "gradients.jsonl") == _rows(tmp_path / "full", "gradients.jsonl")
    wa = load_file(str(tmp_path / "full" / "model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_divergence_is_reported_not_raised(tmp_path, tiny_train_config):
    summary = train(
        tiny_train_config(epochs=3, lr=1e6, warmup=0.0, schedule="constant"), tmp_path / "r", progress=False
    )
    assert summary["status"] == "diverged" and summary["diverged_epoch"] >= 1
    rows = _rows(tmp_path / "r")
    assert len(rows) == summary["diverged_epoch"] - 1  # the epochs before it are kept
    assert not (tmp_path / "r" / "model.safetensors").exists()
    with pytest.raises(DivergedError):
        raise_if_diverged(summary)


def test_cli_divergence_exit_3_without_traceback(tmp_path):
    r = _cli(
        *"--model resnet8 --width 0.25 --epochs 2 --train-subset 256 --val-size 200 --batch-size 64".split(),
        *"--lr 1e6 --warmup 0 --schedule constant --threads 1".split(),
        "--out",
        str(tmp_path / "r"),
    )
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr and "diverged in epoch" in r.stderr
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "diverged"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "-1"], "epochs must be at least 1"),
        (["--technique", "nope"], "unknown technique 'nope'"),
        (["--model", "resnet21"], "unknown model"),
        (["--schedule", "linear"], "schedule must be one of"),
        (["--label-smoothing", "1.5"], "label_smoothing"),
        (["--dataset", "imagenet"], "unknown dataset"),
        (["--technique-arg", "nonsense"], "KEY=VALUE"),
        (["--technique", "layerscale", "--technique-arg", "bogus=1"], "does not take arguments"),
    ],
)
def test_cli_bad_options_exit_2_one_line(tmp_path, capsys, args, message):
    from reslab.cli import main

    assert main(["train", "--out", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_config_files_yaml_and_toml(tmp_path):
    from reslab.cli.commands.train import add_arguments, build_config

    (tmp_path / "c.yaml").write_text(
        "model: resnet8\ntechnique: layerscale\nlr: 5e-2\nepochs: 3\ntechnique_args: {init_value: 1e-4}\n"
    )
    (tmp_path / "c.toml").write_text('[train]\nmodel = "resnet14"\nweight_decay = 1e-4\nflip = false\n')
    (tmp_path / "bad.yaml").write_text("epochz: 3\n")
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = build_config(parser.parse_args(["--out", "x", "--config", str(tmp_path / "c.yaml"), "--epochs", "4"]))
    assert (cfg.model, cfg.lr, cfg.epochs, cfg.technique_args) == ("resnet8", 0.05, 4, {"init_value": 1e-4})
    cfg = build_config(parser.parse_args(["--out", "x", "--config", str(tmp_path / "c.toml")]))
    assert (cfg.model, cfg.weight_decay, cfg.flip) == ("resnet14", 1e-4, False)
    with pytest.raises(UsageError, match=r"unknown option.*epochz"):
        build_config(parser.parse_args(["--out", "x", "--config", str(tmp_path / "bad.yaml")]))
    with pytest.raises(UsageError, match="epochs must be int"):
        TrainConfig.from_dict({"epochs": "ten"})


def test_finished_run_is_not_overwritten(tmp_path, capsys, tiny_train_config):
    out = tmp_path / "r"
    train(tiny_train_config(epochs=1), out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (out / "notes.txt").write_text("mine")
    from reslab.cli import main

    assert main(["train", "--out", str(out), "--epochs", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "notes.txt"} == before
    # --overwrite with a config that is refused later (batch larger than the data) keeps the old run
    with pytest.raises(UsageError, match="batch_size"):
        train(tiny_train_config(batch_size=4096), out, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != "notes.txt"} == before
    train(tiny_train_config(epochs=1, seed=3), out, overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine"  # overwrite removes only the run's files
    assert json.loads((out / "summary.json").read_text())["seed"] == 3


def test_folder_dataset_trains(tmp_path, tiny_train_config):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 6)):
        for c, level in (("dark", 40), ("light", 200)):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(n):
                img = np.clip(rng.normal(level, 30, (16, 16)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(tmp_path / "imgs" / split / c / f"{i}.png")
    cfg = tiny_train_config(
        dataset=f"folder:{tmp_path / 'imgs'}", train_subset=None, val_size=8, batch_size=8, workers=0
    )
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["status"] == "completed" and summary["test_acc"] is not None
    assert read_metadata(tmp_path / "run" / "model.safetensors")["classes"] == ["dark", "light"]


def test_a_runs_config_is_validated_once_and_again_only_when_changed(tmp_path, monkeypatch, capsys):
    from reslab.cli import main

    calls = []
    real = TrainConfig.validate

    def counting(self):
        calls.append(self.to_dict())
        real(self)

    monkeypatch.setattr(TrainConfig, "validate", counting)
    argv = ["train", "--out", str(tmp_path / "r"), "--model", "resnet8", "--width", "0.25", "--batch-size", "64"]
    argv += ["--train-subset", "128", "--val-size", "64", "--epochs", "1", "--threads", "1", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    assert len(calls) == 1 and calls[0]["epochs"] == 1  # built from the options, then passed down
    cfg = TrainConfig.from_dict({"epochs": 1})
    cfg.epochs = 0  # changed after it was checked: checked again
    with pytest.raises(UsageError, match="epochs must be at least 1"):
        cfg.ensure_valid()
