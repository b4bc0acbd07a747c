"""A pack's step as a CUDA graph (reslab.engine.packed.graphed), on the CPU: the graphed path's
arithmetic run eagerly (``capture=False``, ``train_pack(..., graph_capture=False)``) against
the members trained alone and against the eager pack, its frozen members, its resume, and
where ``cuda_graphs`` on a pack is still refused. The capture itself is a CUDA feature:
tests/engine/test_packed_graphed_cuda.py replays it on a GPU.

Tolerances: the graphed update is SGD's arithmetic in other kernels (a member's rate is an
element of a device vector multiplied in by ``addcmul``, not the ``alpha`` of torch's add), so
it equals the eager pack to rounding, not by construction bit for bit (on this CPU it happened
to be equal). Against the members alone the pack runs grouped convolutions, whose float64
rounding (about 1e-16 relative per operation) a dozen steps leave far below the 1e-9 allowed;
a wrong rate, a member's slice moved by another's rate, or a lost momentum buffer moves the
weights by 1e-3 or more. A graphed pack against the eager pack (float32): 1e-5 relative, a
hundred times float32's rounding, far below what one wrong step (the rate of 0.1 times a
gradient) moves."""

from __future__ import annotations

import copy
import json
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

from packs import nan_at, startup_line
from patience import HANG_S
from reslab.engine.graphed import WARMUP_STEPS
from reslab.engine.optim import param_groups
from reslab.engine.packed import PackedModel, train_pack
from reslab.engine.packed.graphed import GraphedPackStep, pack_graphs_refusal
from reslab.engine.train import WALL_CLOCK_FIELDS
from reslab.errors import UsageError
from reslab.nn.models import build_model
from reslab.nn.weights import load_state

K, WD = 3, 0.05  # a decay large enough to show, on the groups that have it
SEEDS = (0, 1, 2)
#: the tiny runs here take 4 steps an epoch (256 images, batch 64)
STEPS_PER_EPOCH = 4


def members(k: int = K) -> list[nn.Module]:
    """``k`` float64 resnet8s with different weights; layerscale adds per-channel parameters
    in a group without decay."""
    out = []
    for s in range(k):
        torch.manual_seed(s)
        out.append(build_model("resnet8", technique="layerscale", num_classes=10, in_channels=1, width=0.25).double())
    return out


def sgd(m: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(param_groups(m, WD), lr=0.1, momentum=0.9, nesterov=True)


def rate(member: int, step: int) -> float:
    """A different learning rate per member and per step."""
    return 0.02 * (member + 1) * (1 + 0.5 * (step % 3))


def no_autocast(cache: bool = True):
    from contextlib import nullcontext

    return nullcontext()


class Alone:
    """The members trained one by one, each with torch's own SGD at its own rate: the
    independent reference."""

    def __init__(self, ms: list[nn.Module]) -> None:
        self.models = ms
        self.opts = [sgd(m) for m in ms]

    def step(self, x: Tensor, y: Tensor, step: int, members: range | list[int]) -> list[Tensor]:
        losses = []
        for i in members:
            m, o = self.models[i], self.opts[i]
            for g in o.param_groups:
                g["lr"] = rate(i, step)
            o.zero_grad()
            loss = F.cross_entropy(m(x[i]), y[i], label_smoothing=0.1)
            loss.backward()
            o.step()
            losses.append(loss.detach())
        return losses


def graphed_pack(ms: list[nn.Module], route: str) -> tuple[PackedModel, list[nn.Module], list[torch.optim.SGD]]:
    ms = [copy.deepcopy(m) for m in ms]
    opts = [sgd(m) for m in ms]
    return PackedModel(ms, opts, WD, 0.9, True, 0.1, route=route), ms, opts


def assert_member_is(pack: PackedModel, i: int, alone: Alone, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    """Member ``i``'s weights, BatchNorm statistics and momentum in the pack are its run alone's."""
    pack.to_members([i])
    got, want = pack.members[i].state_dict(), alone.models[i].state_dict()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=rtol, atol=atol, msg=n)
    mo, ao = pack.member_opts[i].state_dict()["state"], alone.opts[i].state_dict()["state"]
    assert mo.keys() == ao.keys()
    for j in ao:
        torch.testing.assert_close(mo[j]["momentum_buffer"], ao[j]["momentum_buffer"], rtol=rtol, atol=atol)


def batches(sizes: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for n in sizes:
        yield (
            torch.randn(K, n, 1, 28, 28, dtype=torch.float64, generator=g),
            torch.randint(0, 10, (K, n), generator=g),
        )


@pytest.mark.parametrize("route", ["grouped", "vmap"])
def test_each_member_trains_at_its_own_rate_through_warm_up_capture_and_replays(route) -> None:
    """Warm-up, capture, replays and eager steps for a batch of another shape, each member at
    its own learning rate (a vector on the device, never a number in the graph): every member's
    losses, weights, BatchNorm statistics and momentum are its run alone's, by either route."""
    ms = members()
    alone = Alone(copy.deepcopy(ms))
    pack, _, _ = graphed_pack(ms, route)
    step = GraphedPackStep(pack, no_autocast, label_smoothing=0.1, capture=False)
    # a smaller batch at the end of the warm-up (the capture waits for a full one) and after the capture
    sizes = [6] * (WARMUP_STEPS - 1) + [4] + [6] * 4 + [4] + [6] * 2
    for s, (x, y) in enumerate(batches(sizes)):
        want = alone.step(x, y, s, range(K))
        losses, logits = step(x, y, [rate(i, s) for i in range(K)])
        torch.testing.assert_close(losses, torch.stack(want), rtol=1e-9, atol=1e-12)
        assert logits.shape == (K, len(y[0]), 10)
    # warm-up (3), the full batch after the short one (the capture waits for a second like it), the short one after
    assert step.eager_steps == WARMUP_STEPS + 2 and step.captures == 1
    assert step.replays == len(sizes) - WARMUP_STEPS - 2
    for i in range(K):
        assert_member_is(pack, i, alone)
    # the checkpoint's rate is the last step's (members of one train_pack share it)
    assert pack.member_opts[0].state_dict()["param_groups"][0]["lr"] == pytest.approx(rate(0, len(sizes) - 1))
    assert set(step.startup) == {"warmup_s", "warmup_steps", "capture_s", "first_step_s"}
    assert step.startup["warmup_steps"] == WARMUP_STEPS + 1


def member_state(pack: PackedModel, i: int) -> dict[str, Tensor]:
    """Member ``i``'s weights, buffers and momentum as last copied out of the pack."""
    out = {n: t.clone() for n, t in pack.members[i].state_dict().items()}
    out.update({f"m{j}": st["momentum_buffer"] for j, st in pack.member_opts[i].state_dict()["state"].items()})
    return out


def test_a_member_frozen_after_the_capture_stays_frozen_and_the_graph_is_captured_again() -> None:
    """A member that freezes between replays changes what the step must do (put it back), so
    the graph is captured again at the next step; the frozen member's parameters, buffers and
    momentum stay as they were, and the others go on as alone."""
    ms = members()
    alone = Alone(copy.deepcopy(ms))
    pack, _, _ = graphed_pack(ms, "grouped")
    step = GraphedPackStep(pack, no_autocast, label_smoothing=0.1, capture=False)
    frozen_at = WARMUP_STEPS + 3
    snapshot: dict[str, Tensor] = {}
    for s, (x, y) in enumerate(batches([6] * (frozen_at + 4), seed=1)):
        if s == frozen_at:
            pack.freeze(1)
            pack.to_members([1])
            snapshot = member_state(pack, 1)
        alone.step(x, y, s, [0, 2] if s >= frozen_at else range(K))
        step(x, y, [rate(i, s) for i in range(K)])
    assert step.captures == 2 and step.frozen_in_graph == {1}
    pack.to_members([1])
    after = member_state(pack, 1)
    assert after.keys() == snapshot.keys() and all(torch.equal(after[n], snapshot[n]) for n in snapshot)
    for i in (0, 2):
        assert_member_is(pack, i, alone)


def test_a_loss_hook_is_refused_where_the_step_is_really_captured() -> None:
    pack, _, _ = graphed_pack(members(2), "grouped")
    with pytest.raises(ValueError, match="replayed CUDA graph"):
        GraphedPackStep(pack, no_autocast, capture=True, loss_hook=lambda losses: losses)


# ------------------------------------------------------------------ train_pack, graphed


def records(path: Path, name: str = "metrics.jsonl") -> list[dict]:
    rows = [json.loads(line) for line in (path / name).read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK_FIELDS} for r in rows]


def configs(tiny_train_config, seeds=SEEDS, **overrides):
    return [tiny_train_config(seed=s, test_subset=500, evals_per_epoch=2, **overrides) for s in seeds]


def assert_close_records(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key in w:
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), key


def assert_close_weights(a: Path, b: Path) -> None:
    wa, wb = load_state(a, "cpu"), load_state(b, "cpu")
    assert wa.keys() == wb.keys()
    for n in wa:
        torch.testing.assert_close(wa[n], wb[n], rtol=1e-5, atol=1e-7, msg=n)


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_state(a, "cpu"), load_state(b, "cpu")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def eager(tiny_train_config, tmp_path_factory) -> Path:
    """An uninterrupted eager pack of three seeds, 2 epochs."""
    root = tmp_path_factory.mktemp("eager")
    train_pack(configs(tiny_train_config), [root / f"s{s}" for s in SEEDS], progress=False)
    return root


@pytest.fixture(scope="module")
def graphed(tiny_train_config, tmp_path_factory) -> Path:
    """The same pack with cuda_graphs, its graph's work run eagerly."""
    root = tmp_path_factory.mktemp("graphed")
    cs = configs(tiny_train_config, cuda_graphs=True)
    train_pack(cs, [root / f"s{s}" for s in SEEDS], progress=False, graph_capture=False)
    return root


def test_a_graphed_pack_trains_each_member_as_the_eager_pack(eager, graphed) -> None:
    for s in SEEDS:
        g, e = graphed / f"s{s}", eager / f"s{s}"
        assert sorted(p.name for p in g.iterdir()) == sorted(p.name for p in e.iterdir())
        assert_close_records(records(g), records(e))
        assert_close_records(records(g, "evals.jsonl"), records(e, "evals.jsonl"))
        assert_close_weights(g / "model.safetensors", e / "model.safetensors")
        summary = json.loads((g / "summary.json").read_text())
        assert summary["status"] == "completed"
        assert summary["test_acc"] == pytest.approx(json.loads((e / "summary.json").read_text())["test_acc"], abs=0.01)
        cfg = yaml.safe_load((g / "config.yaml").read_text())
        assert cfg["cuda_graphs"] is True and cfg["pack"]["route"] == "grouped"


def test_a_graphed_pack_reports_its_start_up(tiny_train_config, tmp_path, capsys) -> None:
    cs = configs(tiny_train_config, seeds=(0, 1), epochs=1, cuda_graphs=True)
    summaries = train_pack(cs, [tmp_path / "s0", tmp_path / "s1"], progress=None, graph_capture=False)
    err = capsys.readouterr().err
    # in every member's summary.json, as each was written
    for o, summary in zip(("s0", "s1"), summaries, strict=True):
        startup = json.loads((tmp_path / o / "summary.json").read_text())["pack_startup_s"]
        assert startup == summary["pack_startup_s"]
        assert set(startup) == {"build", "warmup", "capture", "first_step", "total"}
        parts = startup["build"] + startup["warmup"] + startup["capture"] + startup["first_step"]
        assert startup["total"] == pytest.approx(parts, abs=0.003)
    assert "packed (grouped, CUDA graph)" in err
    total, parts = startup_line(err, r" \(the graph's work run eagerly, not captured\)")
    assert total == pytest.approx(sum(parts), abs=0.2)  # each part rounded for the line


def test_a_diverging_member_of_a_graphed_pack_is_frozen_and_the_others_are_unchanged(
    eager, tiny_train_config, tmp_path
) -> None:
    """The member diverges after the capture (inside epoch 2): it is recorded as the eager
    pack records it, and the others train as in the eager pack (members never mix)."""
    outs = [tmp_path / f"s{s}" for s in SEEDS]
    cs = configs(tiny_train_config, cuda_graphs=True)
    summaries = train_pack(cs, outs, progress=False, loss_hook=nan_at(1, STEPS_PER_EPOCH + 2), graph_capture=False)
    bad = summaries[1]
    assert bad["status"] == "diverged" and bad["diverged_epoch"] == 2 and bad["epochs_completed"] == 1
    assert_close_records(records(outs[1]), records(eager / "s1")[:1])
    assert not (outs[1] / "model.safetensors").exists()
    assert json.loads((outs[1] / "checkpoint" / "latest.json").read_text())["epoch"] == 1
    for i in (0, 2):
        assert summaries[i]["status"] == "completed"
        assert_close_records(records(outs[i]), records(eager / f"s{SEEDS[i]}"))
        assert_close_weights(outs[i] / "model.safetensors", eager / f"s{SEEDS[i]}" / "model.safetensors")


KILLED = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from reslab.engine.packed import train_pack
    from reslab.engine.train import TrainConfig

    root, step = Path(sys.argv[1]), int(sys.argv[2])
    base = dict(model="resnet8", width=0.25, epochs=2, batch_size=64, train_subset=256, val_size=200,
                eval_batch_size=500, threads=1, test_subset=500, evals_per_epoch=2, cuda_graphs=True)

    def kill(s, losses):
        if s == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return losses

    train_pack([TrainConfig(**base, seed=s) for s in (0, 1, 2)], [root / f"s{s}" for s in (0, 1, 2)],
               progress=False, loss_hook=kill, graph_capture=False)
    """
)


def test_kill_9_of_a_graphed_pack_then_resume_equals_the_uninterrupted_pack(graphed, tiny_train_config, tmp_path):
    """Killed in epoch 2 (its graph captured in epoch 1), resumed from the members' epoch-1
    checkpoints (a new warm-up and capture): every member ends exactly where the uninterrupted
    graphed pack does, so each checkpoint held the member's optimizer state as it was."""
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    root = tmp_path / "runs"
    r = subprocess.run(
        [sys.executable, str(script), str(root), str(STEPS_PER_EPOCH + 2)],
        capture_output=True,
        text=True,
        timeout=HANG_S,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    outs = [root / f"s{s}" for s in SEEDS]
    for o in outs:
        assert json.loads((o / "checkpoint" / "latest.json").read_text())["epoch"] == 1
        assert not (o / "model.safetensors").exists()
    cs = configs(tiny_train_config, cuda_graphs=True)
    summaries = train_pack(cs, outs, resume=True, progress=False, graph_capture=False)
    for s, o, summary in zip(SEEDS, outs, summaries, strict=True):
        ref = graphed / f"s{s}"
        assert summary["status"] == "completed"
        assert records(o) == records(ref)
        assert records(o, "evals.jsonl") == records(ref, "evals.jsonl")
        assert same_weights(o / "model.safetensors", ref / "model.safetensors")


# ------------------------------------------------------------------ where it is refused


def test_cuda_graphs_on_a_pack_are_refused_only_where_they_cannot_run(tiny_train_config, tmp_path) -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert pack_graphs_refusal(cuda, False, False, 0) == ""
    assert "CUDA graphs need a CUDA device, not cpu" in pack_graphs_refusal(cpu, False, False, 0)
    assert pack_graphs_refusal(cpu, False, False, 0, capture=False) == ""  # the eager form runs anywhere
    assert "torchrun" in pack_graphs_refusal(cuda, True, False, 0)
    assert "compile" in pack_graphs_refusal(cuda, False, True, 0)
    assert "probe_every" in pack_graphs_refusal(cuda, False, False, 10, capture=False)
    cumulative = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, momentum=None))
    assert "averages cumulatively" in pack_graphs_refusal(cuda, False, False, 0, cumulative)
    outs = [tmp_path / "s0", tmp_path / "s1"]
    # on the CPU: one line, before any folder is made
    with pytest.raises(UsageError) as e:
        train_pack(configs(tiny_train_config, seeds=(0, 1), cuda_graphs=True, device="cpu"), outs, progress=False)
    assert str(e.value).startswith("cuda_graphs: CUDA graphs need a CUDA device, not cpu") and "\n" not in str(e.value)
    # a pack refuses compile and probe_every whether graphed or not, the eager form included
    for setting, message in (({"compile": True}, "torch.compile"), ({"probe_every": 2}, "probe_every")):
        cs = configs(tiny_train_config, seeds=(0, 1), cuda_graphs=True, **setting)
        with pytest.raises(UsageError, match=message):
            train_pack(cs, outs, progress=False, graph_capture=False)
    assert not any(o.exists() for o in outs)
