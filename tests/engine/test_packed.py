"""Packed training (reslab.engine.packed): K runs that differ only in their seed, trained
as one model, each run the run it would be alone, in its own ordinary run folder."""

from __future__ import annotations

import copy
import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

import reslab
from packs import nan_at
from patience import HANG_S
from reslab.engine.build import open_run_dataset
from reslab.engine.optim import param_groups
from reslab.engine.packed import PackedModel, pack_groups, packable, train_pack
from reslab.engine.train import WALL_CLOCK_FIELDS, train
from reslab.errors import UsageError
from reslab.nn import registry as technique_registry
from reslab.nn.folding import FOLD_DTYPE, MergeFold
from reslab.nn.models import build_model
from reslab.nn.registry import list_techniques
from reslab.nn.weights import load_state

SEEDS = (0, 1, 2)
#: the tiny runs here take 4 steps an epoch (256 images, batch 64)
STEPS_PER_EPOCH = 4


def records(path: Path, name: str = "metrics.jsonl") -> list[dict]:
    rows = [json.loads(line) for line in (path / name).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_FIELDS} for r in rows]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_state(a, "cpu"), load_state(b, "cpu")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def configs(tiny_train_config, seeds=SEEDS, **overrides):
    return [tiny_train_config(seed=s, test_subset=500, evals_per_epoch=2, **overrides) for s in seeds]


@pytest.fixture(scope="module")
def reference(tiny_train_config, tmp_path_factory) -> Path:
    """An uninterrupted pack of three seeds, 2 epochs: what the other tests compare with."""
    root = tmp_path_factory.mktemp("pack")
    train_pack(configs(tiny_train_config), [root / f"s{s}" for s in SEEDS], progress=False)
    return root


def test_packed_runs_equal_runs_alone(reference, tiny_train_config, tmp_path):
    alone = tmp_path / "alone"
    for cfg in configs(tiny_train_config, seeds=(0, 1)):
        train(cfg, alone / f"s{cfg.seed}", progress=False)
    for s in (0, 1):
        packed, solo = reference / f"s{s}", alone / f"s{s}"
        # the same files as a run alone, read by the same readers
        assert sorted(p.name for p in packed.iterdir()) == sorted(p.name for p in solo.iterdir())
        mp, ma = records(packed), records(solo)
        assert len(mp) == len(ma) == 2
        assert mp[0]["train_loss"] == pytest.approx(ma[0]["train_loss"], rel=1e-3)
        assert [r["lr"] for r in mp] == [r["lr"] for r in ma]
        # validations inside epochs, at the same steps
        ep, ea = records(packed, "evals.jsonl"), records(solo, "evals.jsonl")
        assert [(r["epoch"], r["step"]) for r in ep] == [(r["epoch"], r["step"]) for r in ea] and len(ep) == 4
        sp, sa = (json.loads((p / "summary.json").read_text()) for p in (packed, solo))
        assert sp["status"] == "completed" and sp["seed"] == s
        assert abs(sp["test_acc"] - sa["test_acc"]) <= 0.02
        # the config records the pack; a run alone records none
        cfg = yaml.safe_load((packed / "config.yaml").read_text())
        assert cfg["pack"] == {
            "size": 3,
            "index": s,
            "members": ["s0", "s1", "s2"],
            "seeds": list(SEEDS),
            "route": "grouped",
        }
        assert "pack" not in yaml.safe_load((solo / "config.yaml").read_text())


def test_a_pack_of_one_is_a_run_alone_up_to_rounding(tiny_train_config, tmp_path):
    [cfg] = configs(tiny_train_config, seeds=(3,), epochs=1)
    [sp] = train_pack([cfg], [tmp_path / "p"], progress=False)
    sa = train(cfg, tmp_path / "a", progress=False)
    assert sp["status"] == sa["status"] == "completed"
    assert records(tmp_path / "p")[0]["train_loss"] == pytest.approx(records(tmp_path / "a")[0]["train_loss"], rel=1e-4)


@pytest.mark.parametrize("val_size", [200, 0])
def test_a_pack_validates_once_per_epoch(tiny_train_config, tmp_path, monkeypatch, val_size):
    from reslab.engine.sources import ArraySource

    passes: list[str] = []
    real = ArraySource.eval_batches

    def counted(self, which, batch):
        passes.append(which)
        return real(self, which, batch)

    monkeypatch.setattr(ArraySource, "eval_batches", counted)
    cfgs = [tiny_train_config(seed=s, val_size=val_size) for s in (0, 1)]
    summaries = train_pack(cfgs, [tmp_path / f"s{s}" for s in (0, 1)], progress=False)
    # one pass of the pack per epoch for both runs; the test images get their own pass unless they are
    # the validation images, whose last pass then is each run's test result
    assert passes == ["val", "val"] + (["test"] if val_size else [])
    for s, summary in zip((0, 1), summaries, strict=True):
        assert summary["status"] == "completed"
        if not val_size:
            assert summary["test_acc"] == records(tmp_path / f"s{s}")[-1]["val_acc"]


def test_a_diverging_run_is_frozen_and_the_others_are_unchanged(reference, tiny_train_config, tmp_path):
    outs = [tmp_path / f"s{s}" for s in SEEDS]
    step = STEPS_PER_EPOCH + 2  # inside epoch 2
    summaries = train_pack(configs(tiny_train_config), outs, progress=False, loss_hook=nan_at(1, step))
    bad = summaries[1]
    assert bad["status"] == "diverged" and bad["diverged_epoch"] == 2 and bad["epochs_completed"] == 1
    assert len(records(outs[1])) == 1  # the epoch before it kept, as alone
    assert not (outs[1] / "model.safetensors").exists()
    latest = json.loads((outs[1] / "checkpoint" / "latest.json").read_text())
    assert latest["epoch"] == 1  # its last checkpoint is its last good epoch
    for i in (0, 2):
        assert summaries[i]["status"] == "completed"
        assert records(outs[i]) == records(reference / f"s{SEEDS[i]}")
        assert (
            summaries[i]["test_acc"]
            == json.loads((reference / f"s{SEEDS[i]}" / "summary.json").read_text())["test_acc"]
        )
        assert same_weights(outs[i] / "model.safetensors", reference / f"s{SEEDS[i]}" / "model.safetensors")


KILLED = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from reslab.engine.packed import train_pack
    from reslab.engine.train import TrainConfig

    root, step = Path(sys.argv[1]), int(sys.argv[2])
    base = dict(model="resnet8", width=0.25, epochs=2, batch_size=64, train_subset=256, val_size=200,
                eval_batch_size=500, threads=1, test_subset=500, evals_per_epoch=2)

    def kill(s, losses):
        if s == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return losses

    train_pack([TrainConfig(**base, seed=s) for s in (0, 1, 2)], [root / f"s{s}" for s in (0, 1, 2)],
               progress=False, loss_hook=kill)
    """
)


def test_kill_9_of_a_pack_then_resume_equals_an_uninterrupted_pack(reference, tiny_train_config, tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    root = tmp_path / "runs"
    step = STEPS_PER_EPOCH + 2  # after epoch 1's checkpoints, inside epoch 2
    r = subprocess.run(
        [sys.executable, str(script), str(root), str(step)], capture_output=True, text=True, timeout=HANG_S
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    outs = [root / f"s{s}" for s in SEEDS]
    for o in outs:
        assert json.loads((o / "checkpoint" / "latest.json").read_text())["epoch"] == 1
        assert not (o / "model.safetensors").exists()
    summaries = train_pack(configs(tiny_train_config), outs, resume=True, progress=False)
    for s, o, summary in zip(SEEDS, outs, summaries, strict=True):
        ref = reference / f"s{s}"
        assert summary["status"] == "completed"
        assert records(o) == records(ref)
        assert records(o, "evals.jsonl") == records(ref, "evals.jsonl")
        assert summary["test_acc"] == json.loads((ref / "summary.json").read_text())["test_acc"]
        assert same_weights(o / "model.safetensors", ref / "model.safetensors")


def test_a_pack_resumes_only_from_one_epoch(tiny_train_config, tmp_path):
    outs = [tmp_path / "s0", tmp_path / "s1"]
    cs = configs(tiny_train_config, seeds=(0, 1))

    def interrupt(s: int, losses: Tensor) -> Tensor:
        if s == STEPS_PER_EPOCH + 2:
            raise KeyboardInterrupt
        return losses

    with pytest.raises(KeyboardInterrupt):
        train_pack(cs, outs, progress=False, loss_hook=interrupt)
    for o in outs:
        summary = json.loads((o / "summary.json").read_text())
        assert summary["status"] == "interrupted" and summary["interrupted_epoch"] == 2
    shutil.rmtree(outs[1] / "checkpoint")  # s1 now starts from scratch, s0 from epoch 1
    with pytest.raises(UsageError, match="different epochs"):
        train_pack(cs, outs, resume=True, progress=False)
    # each run can still be resumed alone, from the checkpoint the pack wrote
    assert train(cs[0], outs[0], resume=True, progress=False)["status"] == "completed"


def test_runs_that_differ_in_more_than_seed_are_refused(tiny_train_config, tmp_path):
    a, b = configs(tiny_train_config, seeds=(0, 1))
    with pytest.raises(UsageError, match="differ only in their seed"):
        train_pack([a, b.replace(lr=0.05)], [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(UsageError, match="distinct seeds"):
        train_pack([a, a], [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(UsageError, match="run folder each"):
        train_pack([a, b], [tmp_path / "a", tmp_path / "a"])
    assert not (tmp_path / "a").exists()


class Gate(reslab.Technique):
    """``F * sigmoid(gate) + bias + s``: a per-channel gate and a scalar shift, both learnable;
    nothing in it knows about packs."""

    name = "packtest_gate"
    summary = "F(x) * sigmoid(gate) + bias + s"
    parameter_names = ("gate", "bias")

    def add_parameters(self, block: nn.Module, channels: int) -> None:
        block.gate = nn.Parameter(torch.full((channels, 1, 1), 2.0))
        block.bias = nn.Parameter(torch.zeros(1))

    def merge(self, block: nn.Module, branch: Tensor, shortcut: Tensor) -> Tensor:
        return branch * torch.sigmoid(block.gate) + block.bias + shortcut

    def fold_merge(self, block: nn.Module, channels: int) -> MergeFold:
        gain = torch.sigmoid(block.gate.detach()).to(FOLD_DTYPE).reshape(-1)
        return MergeFold(gain=gain, shift=block.bias.detach().to(FOLD_DTYPE))


def test_a_plugin_technique_packs(registry, tiny_train_config, tmp_path):
    technique_registry.register(Gate)
    cs = configs(tiny_train_config, seeds=(0, 1), technique="packtest_gate", epochs=1)
    summaries = train_pack(cs, [tmp_path / "p0", tmp_path / "p1"], progress=False)
    train(cs[0], tmp_path / "a0", progress=False)
    assert [s["status"] for s in summaries] == ["completed", "completed"]
    pack = yaml.safe_load((tmp_path / "p0" / "config.yaml").read_text())["pack"]
    # a scalar and a per-channel parameter: the plugin has a grouped form without saying so
    assert pack["size"] == 2 and pack["route"] == "grouped"
    assert records(tmp_path / "p0")[0]["train_loss"] == pytest.approx(
        records(tmp_path / "a0")[0]["train_loss"], rel=1e-3
    )
    # each run trained its own gates
    w0, w1 = (load_state(tmp_path / p / "model.safetensors", "cpu") for p in ("p0", "p1"))
    gates = [k for k in w0 if k.endswith(".gate")]
    assert gates and not torch.equal(w0[gates[0]], torch.full_like(w0[gates[0]], 2.0))
    assert not torch.equal(w0[gates[0]], w1[gates[0]])


class Branchy(reslab.Technique):
    """A merge that decides on a value of the data in Python, which vmap cannot map, with a
    parameter of a shape that has no grouped form."""

    name = "packtest_branchy"
    parameter_names = ("pair",)

    def add_parameters(self, block: nn.Module, channels: int) -> None:
        block.pair = nn.Parameter(torch.ones(2))

    def merge(self, block: nn.Module, branch: Tensor, shortcut: Tensor) -> Tensor:
        return branch + shortcut * block.pair[0] if float(branch.detach().mean()) < 1e9 else shortcut

    def fold_merge(self, block: nn.Module, channels: int) -> MergeFold:
        return MergeFold()


def test_a_technique_that_cannot_pack_says_why_and_trains_alone(registry, tiny_train_config, tmp_path, capsys):
    technique_registry.register(Branchy)
    cs = configs(tiny_train_config, seeds=(0, 1), technique="packtest_branchy", epochs=1)
    summaries = train_pack(cs, [tmp_path / "p0", tmp_path / "p1"], progress=None)
    assert "cannot train packed" in capsys.readouterr().err
    assert [s["status"] for s in summaries] == ["completed", "completed"]
    assert "pack" not in yaml.safe_load((tmp_path / "p0" / "config.yaml").read_text())


@pytest.mark.parametrize("route", ["vmap", "grouped"])
def test_each_member_steps_as_it_would_alone(tiny_train_config, route):
    """Per step, a member's weights, BatchNorm statistics and momentum follow its run alone
    (no-decay groups included: the decay here is large enough to show), and a frozen
    member stops changing while the others go on, by either route."""
    wd, k, b = 0.05, 2, 8
    alone, opts = [], []
    for s in range(k):
        torch.manual_seed(s)
        m = build_model("resnet8", technique="layerscale", num_classes=10, in_channels=1, width=0.25)
        alone.append(m)
        opts.append(torch.optim.SGD(param_groups(m, wd), lr=0.1, momentum=0.9, nesterov=True))
    members = [copy.deepcopy(m) for m in alone]
    member_opts = [torch.optim.SGD(param_groups(m, wd), lr=0.1, momentum=0.9, nesterov=True) for m in members]
    pack = PackedModel(members, member_opts, wd, 0.9, True, 0.1, route=route)
    g = torch.Generator().manual_seed(0)
    before = None
    for step in range(4):
        x = torch.randn(k, b, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (k, b), generator=g)
        if step == 3:
            pack.to_members([1])
            before = {n: t.clone() for n, t in members[1].state_dict().items()}
            pack.freeze(1)
        for i in range(k if step < 3 else 1):
            loss = F.cross_entropy(alone[i](x[i]), y[i], label_smoothing=0.1)
            opts[i].zero_grad()
            loss.backward()
            opts[i].step()
        losses, _ = pack.train_losses(x, y, 0.1)
        pack.optimizer.zero_grad()
        losses.sum().backward()
        pack.step()
    pack.to_members()
    for i in range(k):
        got, want = members[i].state_dict(), alone[i].state_dict()
        for n in want:
            torch.testing.assert_close(got[n].float(), want[n].float(), rtol=1e-4, atol=1e-5, msg=n)
        mo, ao = member_opts[i].state_dict()["state"], opts[i].state_dict()["state"]
        assert mo.keys() == ao.keys()
        for j in ao:
            torch.testing.assert_close(mo[j]["momentum_buffer"], ao[j]["momentum_buffer"], rtol=1e-4, atol=1e-5)
    assert before is not None
    assert all(torch.equal(members[1].state_dict()[n], before[n]) for n in before)


def test_drop_path_in_a_pack_is_reproducible(tiny_train_config, tmp_path):
    """DropPath draws per member from the pack's (seeds, epoch) stream: the same pack twice
    gives the same runs."""
    cs = configs(tiny_train_config, seeds=(0, 1), epochs=1, drop_path_rate=0.3)
    for name in ("a", "b"):
        train_pack(cs, [tmp_path / name / "s0", tmp_path / name / "s1"], progress=False)
    for s in ("s0", "s1"):
        assert records(tmp_path / "a" / s) == records(tmp_path / "b" / s)
        assert same_weights(tmp_path / "a" / s / "model.safetensors", tmp_path / "b" / s / "model.safetensors")


@pytest.mark.parametrize("technique", list_techniques())
def test_every_built_in_technique_packs(tiny_train_config, technique):
    cfg = tiny_train_config(technique=technique)
    assert packable(cfg, open_run_dataset(cfg)) == ""


def test_pack_groups_packs_runs_that_differ_only_in_seed(tiny_train_config):
    cs = [tiny_train_config(technique=t, seed=s) for t in ("baseline", "scale") for s in range(5)]
    cs.append(tiny_train_config(technique="baseline", seed=0, lr=0.05))
    assert pack_groups(cs, 2) == [[0, 1], [2, 3], [4], [5, 6], [7, 8], [9], [10]]
    assert pack_groups(cs, 8) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10]]
    # a seed twice (two folders of one cell) never shares a pack
    assert pack_groups([cs[0], cs[0]], 4) == [[0], [1]]
