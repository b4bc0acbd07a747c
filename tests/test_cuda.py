"""The engine, the fuser and compare's workers on a CUDA device.

Every test here is marked ``cuda``: it skips on a machine without a GPU (CI) and runs in
``benchmarks/gpu.sh``. The CPU suite covers the same behaviour; these check what only a
device shows: tensors and models really placed on it, mixed precision, and each of
compare's workers pinned to its own GPU.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from patience import HANG_S
from reslab import build_model, fuse, list_techniques
from reslab.study.results import STARTS_FILE

pytestmark = pytest.mark.cuda


@pytest.fixture
def strict_fp32():
    """cuDNN convolutions in full fp32: by default they run in TF32 (10-bit mantissa), which
    moves a ResNet's logits by about 1e-3 relative, a property of the card and not of reslab."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_training_on_the_gpu_is_training_on_the_cpu_and_resumes(tmp_path: Path, tiny_train_config, strict_fp32) -> None:
    """The same run (fp32, same seed) on the GPU and on the CPU: the same images in the same
    order with the same augmentations and the same init, so their losses agree to rounding."""
    from reslab.engine.train import train

    # 4,096 images, 2 epochs of 32 steps: enough to learn well above chance (0.50 measured on the CPU)
    settings = {"schedule": "constant", "warmup": 0, "precision": "fp32", "train_subset": 4096, "batch_size": 128}
    cpu = train(tiny_train_config(device="cpu", **settings), tmp_path / "cpu", progress=False)
    out = tmp_path / "gpu"
    gpu = train(tiny_train_config(device="cuda", **settings), out, progress=False)
    assert gpu["status"] == "completed" and gpu["device"].startswith("cuda")
    assert "device: cuda" in (out / "config.yaml").read_text()

    def losses(run: Path) -> list[float]:
        return [json.loads(x)["train_loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(out)[0] == pytest.approx(losses(tmp_path / "cpu")[0], rel=1e-3)
    # it learned; test accuracy after 64 steps is no check here: it swings widely with rounding
    # (0.42 on the CPU, 0.18 on an H200 for the same run, whose first-epoch losses agreed to 1e-3)
    assert losses(out)[1] < losses(out)[0] and cpu["status"] == "completed"
    # one more epoch from the checkpoint, on the device again
    more = train(tiny_train_config(device="cuda", epochs=3, **settings), out, resume=True, progress=False)
    assert more["status"] == "completed"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]


def test_choosing_the_gpu_lets_cudnn_time_its_algorithms() -> None:
    from reslab.engine.devices import pick_device

    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        pick_device("cpu")
        assert not torch.backends.cudnn.benchmark
        assert pick_device("cuda").type == "cuda" and torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = saved


@pytest.mark.parametrize("technique", list_techniques())
def test_fused_models_match_on_the_gpu(technique: str, strict_fp32) -> None:
    """Folding is exact algebra: in full fp32 the fused model's logits are the model's to 1e-4."""
    torch.manual_seed(0)
    model = build_model("resnet20", technique=technique, num_classes=10, in_channels=1).cuda()
    model.train()
    x = torch.randn(64, 1, 28, 28, device="cuda")
    with torch.no_grad():
        for p in model.parameters():  # a trained-looking model: zero-init layers (fixup, skipinit) move
            p.add_(0.05 * torch.randn_like(p))
        for _ in range(3):  # move the BN statistics away from their init
            model(x)
    model.eval()
    fused = fuse(model).cuda()
    with torch.inference_mode():
        ref, out = model(x), fused(x)
    assert out.device.type == "cuda"
    assert float((ref - out).abs().max() / ref.abs().max()) < 1e-4


@pytest.mark.parametrize("route", ["grouped", "vmap"])
@pytest.mark.parametrize("technique", list_techniques())
def test_a_pack_on_the_gpu_computes_what_its_members_compute(technique: str, route: str) -> None:
    """One packed training step on the GPU (channels_last for the grouped route) in float64
    gives each member's logits and gradients alone to rounding (float32 rounding, amplified by
    depth and ReLU kinks, moved a resnet20's gradients by up to 3% in norm on the CPU), and a
    bf16 autocast pack of the float32 members runs and learns: the CPU suite cannot see the
    CUDA kernels (vmap's BatchNorm refused bf16 here)."""
    from reslab.engine.optim import param_groups
    from reslab.engine.packed import PackedModel
    from reslab.engine.packed.grouped import NotGroupable

    k = 3
    members = []
    for s in range(k):
        torch.manual_seed(s)
        m = build_model("resnet20", technique=technique, num_classes=10, in_channels=1).cuda()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        members.append(m)

    def pack_of(ms: list[torch.nn.Module]) -> PackedModel:
        ms = [copy.deepcopy(m) for m in ms]
        opts = [torch.optim.SGD(param_groups(m, 5e-4), lr=0.05, momentum=0.9, nesterov=True) for m in ms]
        return PackedModel(ms, opts, 5e-4, 0.9, True, 0.05, route=route, channels_last=True)

    doubles = [copy.deepcopy(m).double() for m in members]
    try:
        pack = pack_of(doubles)
    except NotGroupable:
        pytest.skip(f"{technique} has no grouped form; it packs by vmap")
    x = torch.randn(k, 64, 1, 28, 28, device="cuda")
    y = torch.randint(0, 10, (k, 64), device="cuda")
    losses, logits = pack.train_losses(x.double(), y, 0.0)
    losses.sum().backward()
    for i, m in enumerate(doubles):
        out = m(x[i].double())
        torch.nn.functional.cross_entropy(out, y[i]).backward()
        torch.testing.assert_close(logits[i], out, rtol=1e-9, atol=1e-9)
        for n, p in m.named_parameters():
            torch.testing.assert_close(pack.params[n].grad[i], p.grad, rtol=1e-7, atol=1e-9, msg=n)
    # the kernels real runs use: float32 in channels_last (cuDNN runs float64 in NCHW), TF32 off;
    # forward passes only, which rounding moves little (gradients cross ReLU kinks)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        pack = pack_of(members)
        _, logits = pack.train_losses(x, y, 0.0)
        alone = [copy.deepcopy(m).to(memory_format=torch.channels_last) for m in members]
        for i, m in enumerate(alone):
            out = m(x[i].contiguous(memory_format=torch.channels_last))
            assert float((logits[i] - out).abs().max() / out.abs().max()) < 1e-4
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    pack = pack_of(members)
    first = None
    for _ in range(20):  # bf16 autocast, as the engine trains on a GPU: it runs and the loss falls
        pack.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses, _ = pack.train_losses(x, y, 0.0)
        losses.sum().backward()
        pack.step()
        first = losses.detach() if first is None else first
    assert bool(torch.isfinite(losses).all()) and bool((losses.detach() < first).all())
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert pack.eval_logits(x[0]).shape == (k, 64, 10)


def test_the_merge_kernels_gpu_forms_equal_their_cpu_forms_on_the_gpu() -> None:
    """On a GPU the merges run plain autograd forms (measured faster there); in float64 on the
    card they give the CPU forms' values and gradients."""
    from reslab.nn import ops

    gen = torch.Generator(device="cuda").manual_seed(0)

    def leaves(*shapes):
        return [torch.randn(s, dtype=torch.float64, device="cuda", generator=gen).requires_grad_() for s in shapes]

    for gain_shape in ((1,), (6, 1, 1)):
        x, gain, y = leaves((4, 6, 8, 8), gain_shape, (4, 6, 8, 8))
        gpu = ops.add_scaled(x, gain, y)
        assert type(gpu.grad_fn).__name__ == "AddcmulBackward0"
        cpu_form = ops.add_scaled_lean(x, gain, y)
        g = torch.randn_like(gpu)
        torch.testing.assert_close(gpu, cpu_form)
        want = torch.autograd.grad(cpu_form, (x, gain, y), g)
        for got, ref in zip(torch.autograd.grad(gpu, (x, gain, y), g), want, strict=True):
            torch.testing.assert_close(got, ref)
    for groups in (1, 3):
        a, b, w, bias = leaves((2, 4 * groups, 5, 5), (2, 4 * groups, 5, 5), (4 * groups, 8, 1, 1), (4 * groups,))
        gpu = ops.fused_concat_conv1x1(a, b, w, bias, add_identity=True)
        cpu_form = ops.concat_conv1x1_split(a, b, w, bias, add_identity=True)
        g = torch.randn_like(gpu)
        torch.testing.assert_close(gpu, cpu_form)
        want = torch.autograd.grad(cpu_form, (a, b, w, bias), g)
        for got, ref in zip(torch.autograd.grad(gpu, (a, b, w, bias), g), want, strict=True):
            torch.testing.assert_close(got, ref)


def test_a_run_with_cuda_graphs_trains_as_the_eager_run(tmp_path: Path, tiny_train_config, strict_fp32) -> None:
    """The same fp32 run eager and with its step replayed as a CUDA graph: the graph starts
    after 3 eager steps and the runs agree to rounding; in bf16 a graphed run learns and
    resumes from its checkpoint."""
    from reslab.engine.train import train

    settings = {"precision": "fp32", "train_subset": 4096, "batch_size": 128, "device": "cuda"}
    eager = tmp_path / "eager"
    graphed = tmp_path / "graphed"
    train(tiny_train_config(**settings), eager, progress=False)
    s = train(tiny_train_config(cuda_graphs=True, **settings), graphed, progress=False)
    assert s["status"] == "completed"

    def losses(run: Path) -> list[float]:
        return [json.loads(x)["train_loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(graphed)[0] == pytest.approx(losses(eager)[0], rel=1e-3)
    assert losses(graphed)[1] == pytest.approx(losses(eager)[1], rel=1e-2)
    bf16 = tmp_path / "bf16"
    # a constant learning rate without warm-up, so the completed run may be extended by an epoch
    # (a one-cycle run's rate has reached zero: reslab refuses to extend it)
    extendable = {"schedule": "constant", "warmup": 0, "train_subset": 4096, "batch_size": 128, "device": "cuda"}
    cfg = tiny_train_config(cuda_graphs=True, **extendable)
    assert train(cfg, bf16, progress=False)["status"] == "completed"
    assert losses(bf16)[1] < losses(bf16)[0]
    more = train(
        tiny_train_config(cuda_graphs=True, epochs=3, **extendable),
        bf16,
        resume=True,
        progress=False,
    )
    assert more["status"] == "completed" and len(losses(bf16)) == 3


def test_compare_pins_each_worker_to_a_gpu(tmp_path: Path) -> None:
    out = tmp_path / "res"
    args = [sys.executable, "-m", "reslab", "compare", "--models", "resnet8", "--width", "0.25"]
    args += ["--train-subset", "512", "--val-size", "256", "--epochs", "1", "--techniques", "baseline,scale"]
    args += ["--seeds", "2", "--no-probe", "--quiet", "--jobs", "2", "--device", "cuda", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert res.returncode == 0, res.stderr
    pinned = set()
    for run in (out / "runs").iterdir():
        (start,) = [json.loads(x) for x in (run / STARTS_FILE).read_text().splitlines()]
        pinned.add(start["gpus"])
    n = torch.cuda.device_count()
    assert pinned <= {str(i) for i in range(n)}
    assert len(pinned) == min(2, n)  # two workers on two GPUs, or both on the only one
