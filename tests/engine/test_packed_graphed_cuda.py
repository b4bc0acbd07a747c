"""A pack's step really captured as a CUDA graph (reslab.engine.packed.graphed) on a GPU.

Every test here is marked ``cuda``: it skips without a GPU (CI) and runs in
``benchmarks/gpu.sh`` (its ``cuda-tests`` step). tests/engine/test_packed_graphed.py checks
the same arithmetic run eagerly on the CPU; these check what only the device shows: that the
captured graph replays that arithmetic (inputs, per-member learning rates, momentum, BatchNorm
statistics, frozen members), and what a graphed pack reports of its start-up.

Tolerances: in full fp32 (TF32 off) the graph runs the eager step's kernels, but cuDNN's
backward convolutions may sum in another order from call to call, and a dozen steps amplify
that through ReLU kinks; 1e-4 relative on the losses and 1e-3 on each weight tensor's norm
allow it, while a learning rate missed or misapplied for one step moves the weights by about
the rate (0.05) relative.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from packs import startup_line
from reslab.engine.graphed import WARMUP_STEPS
from reslab.engine.optim import param_groups
from reslab.engine.packed import PackedModel
from reslab.engine.packed.graphed import GraphedPackStep
from reslab.nn.models import build_model

pytestmark = pytest.mark.cuda

K = 4


@pytest.fixture
def strict_fp32():
    """cuDNN and matmuls in full fp32 (not TF32), so rounding is fp32's."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def resnet8s() -> list[nn.Module]:
    out = []
    for s in range(K):
        torch.manual_seed(s)
        out.append(build_model("resnet8", technique="layerscale", num_classes=10, in_channels=1).cuda())
    return out


def pack_of(ms: list[nn.Module], route: str) -> PackedModel:
    ms = [copy.deepcopy(m) for m in ms]
    opts = [torch.optim.SGD(param_groups(m, 5e-4), lr=0.05, momentum=0.9, nesterov=True) for m in ms]
    return PackedModel(ms, opts, 5e-4, 0.9, True, 0.05, route=route, channels_last=True)


def null_autocast(cache: bool = True):
    from contextlib import nullcontext

    return nullcontext()


def assert_state_close(got: PackedModel, want: PackedModel, rel: float) -> None:
    for table in ("params", "buffers"):
        for n, t in getattr(want, table).items():
            g, t = getattr(got, table)[n].detach(), t.detach()
            if t.is_floating_point():
                assert float((g - t).norm()) <= rel * float(t.norm()) + 1e-6, n
            else:
                assert torch.equal(g, t), n
    for (n, b), (_, c) in zip(want._momentum().items(), got._momentum().items(), strict=True):
        assert float((c - b).norm()) <= rel * float(b.norm()) + 1e-6, n


@pytest.mark.parametrize("route", ["grouped", "vmap"])
def test_a_captured_pack_step_replays_the_eager_pack_step(route: str, strict_fp32) -> None:
    """A pack of 4 resnet8s: warm-up, capture, replays (with a batch of another shape between
    them) against the eager pack (torch's SGD) at the same schedule, step by step; then a
    member frozen between replays: the graph is captured again, the member stays as it was."""
    ms = resnet8s()
    eager, graphed = pack_of(ms, route), pack_of(ms, route)
    step = GraphedPackStep(graphed, null_autocast, label_smoothing=0.1)
    gen = torch.Generator(device="cuda").manual_seed(0)
    sizes = [64] * (WARMUP_STEPS + 4) + [32] + [64] * 3
    for s, n in enumerate(sizes):
        x = torch.randn(K, n, 1, 28, 28, device="cuda", generator=gen)
        y = torch.randint(0, 10, (K, n), device="cuda", generator=gen)
        lr = 0.05 * (1 + s % 3) / 3  # the rate changes from step to step: it must not be baked in
        for g in eager.optimizer.param_groups:
            g["lr"] = lr
        want, _ = eager.train_losses(x, y, 0.1)
        eager.optimizer.zero_grad(set_to_none=True)
        want.sum().backward()
        eager.step()
        got, logits = step(x, y, [lr] * K)
        torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-5)
        assert logits.shape == (K, n, 10) and logits.device.type == "cuda"
    assert step.captures == 1 and step.replays == len(sizes) - WARMUP_STEPS - 1  # the short batch: eager
    assert_state_close(graphed, eager, 1e-3)
    # a member frozen between replays: captured again, and it no longer changes
    graphed.freeze(2)
    frozen = {n: t[2].clone() for n, t in graphed.params.items()}
    for _ in range(3):
        x = torch.randn(K, 64, 1, 28, 28, device="cuda", generator=gen)
        y = torch.randint(0, 10, (K, 64), device="cuda", generator=gen)
        step(x, y, [0.05] * K)
    assert step.captures == 2
    assert all(torch.equal(graphed.params[n][2], t) for n, t in frozen.items())
    assert not torch.equal(graphed.params["fc.weight"][0], eager.params["fc.weight"][0])  # the others moved on


def test_a_graphed_pack_trains_as_the_eager_pack_reports_its_start_up_and_resumes(
    tmp_path: Path, tiny_train_config, strict_fp32, capsys, monkeypatch
) -> None:
    """train_pack with cuda_graphs on the GPU: each member's losses are the eager pack's to
    rounding, the pack says its start-up (build, warm-up, capture, first step), and in bf16 a
    graphed pack learns and, interrupted, resumes from its members' checkpoints."""
    from reslab.engine.packed import loop, train_pack

    seeds = range(K)
    settings = {"precision": "fp32", "train_subset": 4096, "batch_size": 128, "device": "cuda"}

    def run(root: Path, **more) -> list[dict]:
        cfgs = [tiny_train_config(seed=s, **settings, **more) for s in seeds]
        return train_pack(cfgs, [root / f"s{s}" for s in seeds], progress=None)

    def losses(run_dir: Path) -> list[float]:
        return [json.loads(x)["train_loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]

    run(tmp_path / "eager")
    capsys.readouterr()
    summaries = run(tmp_path / "graphed", cuda_graphs=True)
    err = capsys.readouterr().err
    assert [s["status"] for s in summaries] == ["completed"] * K
    assert all(set(s["pack_startup_s"]) == {"build", "warmup", "capture", "first_step", "total"} for s in summaries)
    for s in seeds:
        g, e = losses(tmp_path / "graphed" / f"s{s}"), losses(tmp_path / "eager" / f"s{s}")
        assert g[0] == pytest.approx(e[0], rel=1e-3)
        assert g[1] == pytest.approx(e[1], rel=1e-2)
    assert "CUDA graph" in err
    startup_line(err)  # the time itself is the benchmark's to report (benchmarks/pack_speed.py --graphs)
    # bf16: a graphed pack learns; one interrupted in epoch 2 resumes from its members' epoch-1
    # checkpoints (a new warm-up and capture) and ends as the uninterrupted one, to rounding
    bf16 = {**settings, "precision": "bf16"}
    cfgs = [tiny_train_config(seed=s, cuda_graphs=True, **bf16) for s in seeds]
    whole = [tmp_path / "bf16" / f"s{s}" for s in seeds]
    assert [s["status"] for s in train_pack(cfgs, whole, progress=False)] == ["completed"] * K
    assert all(losses(o)[1] < losses(o)[0] for o in whole)
    evaluate, calls = loop._evaluate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # epoch 2's validation: its steps are trained, its checkpoint not written
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    outs = [tmp_path / "resumed" / f"s{s}" for s in seeds]
    monkeypatch.setattr(loop, "_evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_pack(cfgs, outs, progress=False)
    monkeypatch.setattr(loop, "_evaluate", evaluate)
    assert all(json.loads((o / "checkpoint" / "latest.json").read_text())["epoch"] == 1 for o in outs)
    assert [s["status"] for s in train_pack(cfgs, outs, resume=True, progress=False)] == ["completed"] * K
    for o, w in zip(outs, whole, strict=True):
        assert len(losses(o)) == 2 and losses(o) == pytest.approx(losses(w), rel=1e-2)
