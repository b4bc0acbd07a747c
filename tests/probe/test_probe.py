"""reslab.probe and ``reslab probe``: measurements checked against independent computations,
the specification's depth relations on real fashion-mnist batches, verdicts, determinism,
and the command line's files and errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from patience import HANG_S
from reslab.cli import main
from reslab.nn.blocks import residual_blocks
from reslab.nn.models import build_model, cifar_resnet
from reslab.nn.techniques import parse_techniques
from reslab.probe.measure import BlockProbe, ModelProbe, _channel_stats, _sq_norm, probe_model, ratio_threshold, verdict
from reslab.probe.records import entry_from_dict, entry_to_dict, read_probe
from reslab.probe.runner import make_batches, probe_cell, resolve_depths, run_probe


@pytest.fixture(scope="module")
def fashion():
    from reslab.engine.data import load_arrays

    return load_arrays("fashion-mnist")


@pytest.fixture(scope="module")
def batch32(fashion):
    return make_batches(fashion.train_x, fashion.train_y, fashion.mean, fashion.std, 1, 32, seed=0)


@pytest.fixture(autouse=True)
def _one_thread():
    # The CPU is shared with the rest of the suite; single-threaded results are also the
    # ones the parallel workers produce.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------
# The measurements, against a direct autograd computation.


def _reference(model, x, y):
    """Per-block output stats and gradients computed independently: retain each block
    output, then torch.autograd.grad of the loss w.r.t. all of them and the parameters."""
    blocks = residual_blocks(model)
    outs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o)) for _, b in blocks]
    model.train()
    loss = F.cross_entropy(model(x), y)
    for h in hooks:
        h.remove()
    params = [list(b.parameters()) for _, b in blocks]
    flat = [p for ps in params for p in ps]
    grads = torch.autograd.grad(loss, outs + flat)
    out_grads, p_grads = grads[: len(outs)], grads[len(outs) :]
    ref = []
    k = 0
    for o, g, ps in zip(outs, out_grads, params, strict=True):
        var, mean = torch.var_mean(o.detach().double(), dim=(0, 2, 3), correction=0)
        pg = p_grads[k : k + len(ps)]
        k += len(ps)
        ref.append(
            {
                "out_mean": mean.mean().item(),
                "out_var": var.mean().item(),
                "out_mean_sq": (mean**2).mean().item(),
                "grad_rms": g.double().pow(2).mean().sqrt().item(),
                "param_grad_norm": math.sqrt(sum(t.double().pow(2).sum().item() for t in pg)),
            }
        )
    return ref


@pytest.mark.parametrize("technique", ["baseline", "norm", "fusion", "preact"])
def test_probe_model_matches_direct_autograd(technique, batch32):
    torch.manual_seed(3)
    model = cifar_resnet(14, technique=technique, num_classes=10, in_channels=1, width=0.5)
    ref_model = cifar_resnet(14, technique=technique, num_classes=10, in_channels=1, width=0.5)
    ref_model.load_state_dict(model.state_dict())
    x, y = batch32[0]
    ref = _reference(ref_model, x, y)
    probe = probe_model(model, [(x, y)])
    assert len(probe.blocks) == len(ref) == 6
    for b, r in zip(probe.blocks, ref, strict=True):
        for key, value in r.items():
            assert getattr(b, key) == pytest.approx(value, rel=1e-4, abs=1e-12), (b.name, key)
    rms = [r["grad_rms"] for r in ref]
    assert probe.grad_ratio == pytest.approx(max(rms) / min(rms), rel=1e-4)
    assert probe.grad_first_last == pytest.approx(rms[0] / rms[-1], rel=1e-4)


def test_probe_model_leaves_the_model_as_it_was(batch32):
    model = build_model("resnet8", technique="norm", num_classes=10, in_channels=1, width=0.25).eval()
    marker = torch.full_like(model.fc.weight, 7.0)
    model.fc.weight.grad = marker.clone()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe_model(model, batch32)
    assert not model.training
    assert torch.equal(model.fc.weight.grad, marker)
    assert model.conv1.weight.grad is None
    after = model.state_dict()
    # BatchNorm running statistics would have moved in train mode; they are restored.
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_several_batches_average_mean_squares(fashion):
    batches = make_batches(fashion.train_x, fashion.train_y, fashion.mean, fashion.std, 2, 16, seed=1)
    model = cifar_resnet(8, technique="baseline", in_channels=1, width=0.25)
    singles = [probe_model(model, [b]) for b in batches]
    both = probe_model(model, batches)
    for i, b in enumerate(both.blocks):
        # RMS over two equal-size batches: sqrt of the mean of the two mean squares.
        expect = math.sqrt((singles[0].blocks[i].grad_rms ** 2 + singles[1].blocks[i].grad_rms ** 2) / 2)
        assert b.grad_rms == pytest.approx(expect, rel=1e-6)
        assert b.out_var == pytest.approx((singles[0].blocks[i].out_var + singles[1].blocks[i].out_var) / 2)


def test_channel_stats_match_var_mean_in_both_layouts():
    x = torch.randn(8, 5, 6, 7) * 3 + torch.arange(5.0).view(1, 5, 1, 1) * 10
    var, mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    for t in (x, x.contiguous(memory_format=torch.channels_last)):
        m, v = _channel_stats(t)
        torch.testing.assert_close(m, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, var, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e25])
def test_squared_norm_survives_float32_overflow_and_underflow(scale):
    # 1e25**2 overflows float32 and 1e-30**2 underflows it; the float64 value is exact.
    t = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float32) * scale
    expect = float(torch.tensor([3.0, 4.0], dtype=torch.float64).mul(float(t[0]) / 3.0).pow(2).sum())
    assert _sq_norm(t) == pytest.approx(expect, rel=1e-6)
    assert _sq_norm(torch.zeros(4)) == 0.0


# ---------------------------------------------------------------------------------------
# The specification's relations (SPEC.md, second table) on real fashion-mnist batches.


@pytest.mark.slow
def test_depth_relations_reproduce_the_specification(batch32):
    """Full width (16/32/64, as in SPEC.md), one real batch of 32: cheap enough for CI and
    still far from every threshold. A change to any of these merges shows here."""
    cell = {}
    for technique, depth in [
        ("baseline", 20),
        ("baseline", 218),
        ("scale", 218),
        ("skipinit", 218),
        ("zero_init", 218),
        ("norm", 110),
        ("fusion", 110),
    ]:
        cell[technique, depth] = probe_cell(technique, depth, batch32, num_classes=10, seed=0)

    # Plain and shortcut-scaled residuals: gradients grow slowly with depth.
    assert 1.0 < cell["baseline", 20].grad_ratio < cell["baseline", 218].grad_ratio < 1e3
    # scale = 1 at init is exactly the plain merge, so block-output gradients are the same.
    assert cell["scale", 218].grad_ratio == pytest.approx(cell["baseline", 218].grad_ratio, rel=1e-6)
    # The article's normalization and fusion merges have no identity path: they explode.
    assert cell["norm", 110].grad_ratio > 1e5
    assert cell["fusion", 110].grad_ratio > 1e5
    for t in ("norm", "fusion"):
        assert cell[t, 110].grad_first_last > 1.0  # largest at the input
        assert verdict(cell[t, 110]).label == "exploding"
    # A branch zeroed at init leaves identity blocks: ratio near 1, the same for both.
    assert cell["skipinit", 218].grad_ratio < 2.0
    assert cell["zero_init", 218].grad_ratio == pytest.approx(cell["skipinit", 218].grad_ratio, rel=1e-6)
    for key in [("baseline", 218), ("scale", 218), ("skipinit", 218), ("zero_init", 218)]:
        assert verdict(cell[key]).label == "healthy"
    # Parameter gradients of a zeroed branch's first conv are zero, so SPEC's first-table
    # figure is undefined there while the headline ratio stays defined.
    assert math.isnan(cell["skipinit", 218].conv1_ratio)


def test_fixup_has_no_gradient_flow_at_init(batch32):
    # Fixup zero-initialises the classifier, so d loss / d features is exactly zero.
    probe = probe_cell("fixup", 14, batch32, num_classes=10, width=0.5)
    assert all(b.grad_rms == 0.0 for b in probe.blocks)
    assert math.isnan(probe.grad_ratio)
    assert verdict(probe).label == "undefined"


@pytest.mark.parametrize("technique", ["fixup", "baseline"])
def test_skipped_backward_of_a_zero_gradient_changes_nothing(technique, batch32):
    # Passing blocks explicitly turns the shortcut off, so this compares with a full backward.
    model = cifar_resnet(14, technique=technique, num_classes=10, in_channels=1, width=0.25)
    fast = probe_model(model, batch32)
    full = probe_model(model, batch32, blocks=residual_blocks(model))
    assert fast.blocks == full.blocks


# ---------------------------------------------------------------------------------------
# Verdicts.


def _synthetic(rms: list[float], finite: bool = True) -> ModelProbe:
    blocks = [BlockProbe(f"b{i}", i, 0.0, 1.0, 0.0, r, 1.0, 1.0) for i, r in enumerate(rms)]
    first_last = rms[0] / rms[-1] if rms[-1] else math.inf
    nonzero = [r for r in rms if r]
    ratio = max(rms) / min(rms) if min(rms) > 0 else (math.inf if nonzero else math.nan)
    return ModelProbe(blocks, 1.0, 2.3, ratio, first_last, 1.0, finite, 1)


def test_verdict_thresholds():
    assert ratio_threshold(3) == 10.0
    assert ratio_threshold(54) == 54**2
    # 9 blocks: threshold 81.
    assert verdict(_synthetic([80.0] + [1.0] * 8)).label == "healthy"
    assert verdict(_synthetic([82.0] + [1.0] * 8)).label == "exploding"
    assert verdict(_synthetic([1.0] * 8 + [82.0])).label == "vanishing"
    assert verdict(_synthetic([0.0] * 9)).label == "undefined"
    assert verdict(_synthetic([1.0] * 9, finite=False)).label == "exploding"


def test_resolvers_reject_bad_input():
    assert resolve_depths("56,20,20") == [20, 56]
    assert parse_techniques("all")[0] == "baseline"
    with pytest.raises(ValueError, match="6n\\+2"):
        resolve_depths("20,51")
    with pytest.raises(ValueError, match="valid techniques"):
        parse_techniques("baseline,nope")


# ---------------------------------------------------------------------------------------
# Determinism and the parallel path.


@pytest.mark.slow
def test_same_seed_same_numbers_in_process_and_in_workers(batch32):
    kwargs = dict(num_classes=10, width=0.25, seed=5)
    serial = run_probe(["baseline", "norm"], [8, 14], batch32, workers=1, **kwargs)
    again = run_probe(["baseline", "norm"], [8, 14], batch32, workers=1, **kwargs)
    parallel = run_probe(["baseline", "norm"], [8, 14], batch32, workers=2, **kwargs)
    other = run_probe(["baseline", "norm"], [8, 14], batch32, workers=1, num_classes=10, width=0.25, seed=6)
    assert [(e.technique, e.depth) for e in serial] == [("baseline", 8), ("norm", 8), ("baseline", 14), ("norm", 14)]
    for a, b, c in zip(serial, again, parallel, strict=True):
        assert a.probe.blocks == b.probe.blocks
        # Workers run one thread, as here: the same kernels, so the same bits.
        assert a.probe.blocks == c.probe.blocks
    assert serial[0].probe.blocks != other[0].probe.blocks
    # probe.json round trip: what the command writes reads back as the same measurements.
    for e in serial:
        assert entry_from_dict(json.loads(json.dumps(entry_to_dict(e)))).probe == e.probe


def test_float64_agrees_with_float32(batch32):
    p32 = probe_cell("fusion", 14, batch32, num_classes=10, width=0.25, seed=2)
    p64 = probe_cell("fusion", 14, batch32, num_classes=10, width=0.25, seed=2, dtype=torch.float64)
    assert p64.grad_ratio == pytest.approx(p32.grad_ratio, rel=1e-3)
    assert [b.out_var for b in p64.blocks] == pytest.approx([b.out_var for b in p32.blocks], rel=1e-3)


# ---------------------------------------------------------------------------------------
# The command line.


def test_cli_writes_tables_figures_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "p"
    argv = ["probe", "-t", "baseline,skipinit,fixup", "-d", "8,14", "--batches", "2", "--batch-size", "16"]
    argv += ["--width", "0.25", "--workers", "1", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "ResNet-14" in printed and "undefined" in printed
    data = json.loads((out / "probe.json").read_text())
    config, entries = read_probe(out / "probe.json")
    assert config == data["config"] and len(entries) == 6
    assert data["config"]["depths"] == [8, 14] and data["config"]["batches"] == 2
    assert data["config"]["device"]["type"] == "cpu"  # the default, named with the processor
    assert data["config"]["device"]["name"]
    cells = {(r["technique"], r["depth"]): r for r in data["results"]}
    assert len(cells) == 6
    assert cells["fixup", 8]["grad_ratio"] is None and cells["fixup", 8]["verdict"] == "undefined"
    assert len(cells["baseline", 14]["blocks"]) == 6
    assert cells["baseline", 14]["verdict"] == "healthy"
    md = (out / "probe.md").read_text()
    assert "| baseline |" in md and "signal_propagation.png" in md
    for png in ("signal_propagation.png", "gradient_ratio.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    before = (out / "probe.json").read_bytes()
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "probe.json").read_bytes() == before
    assert main([*argv, "--overwrite"]) == 0
    # Same seed, same numbers (the config line's timings aside).
    again = json.loads((out / "probe.json").read_text())
    assert [r["blocks"] for r in again["results"]] == [r["blocks"] for r in data["results"]]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["-d", "20,21"], "6n+2"),
        (["-t", "baseline,resnorm"], "valid techniques"),
        (["--batches", "0"], "--batches"),
        (["--dataset", "nope"], "unknown dataset"),
    ],
)
def test_cli_user_errors_are_one_line(tmp_path, capsys, extra, message):
    out = tmp_path / "p"
    assert main(["probe", "--out", str(out), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not out.exists()


def test_cli_probes_saved_weights_like_the_library(tmp_path, fashion, capsys):
    from reslab.nn.weights import save_weights

    torch.manual_seed(4)
    model = build_model("resnet14", technique="scale", num_classes=10, in_channels=1, width=0.25)
    with torch.no_grad():
        for _, block in residual_blocks(model):
            block.scale.fill_(0.5)  # as if trained: the probe must use these weights
    extra = {"dataset": "fashion-mnist", "input_size": [1, 28, 28]}
    extra.update(mean=list(fashion.mean), std=list(fashion.std))
    save_weights(tmp_path / "run" / "model.safetensors", model, extra=extra)
    out = tmp_path / "p"
    argv = ["probe", "--weights", str(tmp_path / "run"), "--batches", "2", "--batch-size", "16", "--seed", "3"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "probe.json").read_text())["results"]
    assert [(r["technique"], r["depth"]) for r in result] == [("scale", 14)]
    batches = make_batches(fashion.train_x, fashion.train_y, fashion.mean, fashion.std, 2, 16, seed=3)
    direct = probe_model(model, batches)
    # The command runs channels_last, whose float32 BatchNorm kernels round more than the
    # NCHW ones used here (measured: ~1e-4 relative on this net, against float64).
    assert result[0]["grad_ratio"] == pytest.approx(direct.grad_ratio, rel=2e-3)
    assert [b["out_var"] for b in result[0]["blocks"]] == pytest.approx([b.out_var for b in direct.blocks], rel=2e-3)
    capsys.readouterr()
    assert main([*argv, "--depths", "20", "--out", str(tmp_path / "q")]) == 2
    assert "drop --depths" in capsys.readouterr().err


def test_interrupting_the_probe_process_alone_stops_its_workers(tmp_path):
    # A SIGINT sent to the probe's own process (not a terminal's Ctrl-C, which reaches the
    # whole group) must still stop the worker processes: they ignore SIGINT and are
    # terminated by the parent, at once, because a half-probed cell is worth nothing.
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    out = tmp_path / "p"
    argv = [sys.executable, "-m", "reslab", "probe", "-t", "baseline,norm", "-d", "218", "--batches", "4"]
    argv += ["--workers", "2", "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(
        argv,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background shell ignores it
    )

    def members() -> list[int]:
        found = []
        for p in Path("/proc").iterdir():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[-1].split()
            except OSError:
                continue
            if p.name.isdigit() and fields[0] != "Z" and int(fields[3]) == proc.pid:
                found.append(int(p.name))
        return found

    deadline = time.monotonic() + 120
    while len(members()) < 3 and time.monotonic() < deadline:  # the parent and both workers
        time.sleep(0.1)
    time.sleep(3)  # the workers are now inside their depth-218 cells
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=HANG_S)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    deadline = time.monotonic() + 15
    while members() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert members() == []
    assert not (out / "probe.json").exists()


def test_cli_cuda_without_a_gpu_is_a_user_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "p"
    assert main(["probe", "-d", "8", "--device", "cuda", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA GPU" in err
    assert not out.exists()


def test_the_probe_turns_tf32_off_only_while_it_runs():
    from reslab.probe.runner import full_precision

    before = torch.backends.cudnn.allow_tf32
    with full_precision():
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.allow_tf32 == before


def test_run_probe_on_a_device_gives_the_cpu_numbers(fashion):
    from reslab.probe.runner import make_batches, run_probe

    batches = make_batches(fashion.train_x, fashion.train_y, fashion.mean, fashion.std, 1, 16, seed=0)
    here = run_probe(["baseline"], [8], batches, 10, width=0.25)
    there = run_probe(["baseline"], [8], batches, 10, width=0.25, device=torch.device("cpu"))
    assert here[0].probe.grad_ratio == pytest.approx(there[0].probe.grad_ratio, rel=1e-6)


@pytest.mark.cuda
def test_run_probe_on_the_gpu_agrees_with_the_cpu(fashion):
    from reslab.probe.runner import make_batches, run_probe

    batches = make_batches(fashion.train_x, fashion.train_y, fashion.mean, fashion.std, 1, 16, seed=0)
    cpu = run_probe(["baseline"], [8], batches, 10, width=0.25)
    gpu = run_probe(["baseline"], [8], batches, 10, width=0.25, device="cuda", workers=2)
    # the same init (drawn on the CPU) and float32 arithmetic (no TF32): the same figures to rounding
    assert gpu[0].probe.grad_ratio == pytest.approx(cpu[0].probe.grad_ratio, rel=1e-3)
    assert torch.backends.cudnn.allow_tf32  # the probe put the default back
