"""The graphed training step (reslab.engine.graphed): its SGD update against torch.optim.SGD,
its bookkeeping (warm-up, capture, replay, a batch of another shape) run eagerly on the CPU,
and the settings it refuses. The capture itself is a CUDA feature: tests/test_cuda.py trains
with it on a GPU."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reslab.engine.graphed import WARMUP_STEPS, CapturableSGD, GraphedStep, graphs_refusal
from reslab.engine.optim import param_groups
from reslab.errors import UsageError
from reslab.nn.models import build_model


def model_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    m = build_model("resnet8", technique="scale", num_classes=10, in_channels=1, width=0.25).double()
    return m, copy.deepcopy(m)


@pytest.mark.parametrize(
    "settings",
    [
        {"momentum": 0.9, "nesterov": True, "wd": 5e-4},
        {"momentum": 0.9, "nesterov": False, "wd": 1e-4},
        {"momentum": 0.9, "nesterov": False, "wd": 0.0, "dampening": 0.1},
        {"momentum": 0.0, "nesterov": False, "wd": 5e-4},
        {"momentum": 0.9, "nesterov": True, "wd": 0.0},
    ],
    ids=["nesterov-decay", "momentum-decay", "dampening", "plain", "nesterov-no-decay"],
)
def test_capturable_sgd_is_torch_sgd(settings) -> None:
    """Five steps with changing learning rates, two parameter groups (decayed and not): the
    same weights and momentum buffers as torch.optim.SGD."""
    a, b = model_pair()
    kw = {"momentum": settings["momentum"], "nesterov": settings["nesterov"], "dampening": settings.get("dampening", 0)}
    ref = torch.optim.SGD(param_groups(a, settings["wd"]), lr=0.1, **kw)
    opt = torch.optim.SGD(param_groups(b, settings["wd"]), lr=0.1, **kw)
    ours = CapturableSGD(opt)
    lr = {torch.float64: torch.zeros((), dtype=torch.float64)}
    g = torch.Generator().manual_seed(1)
    for step, rate in enumerate((0.1, 0.05, 0.2, 0.01, 0.1)):
        x, y = torch.randn(8, 1, 28, 28, dtype=torch.float64, generator=g), torch.randint(0, 10, (8,), generator=g)
        for m, o in ((a, ref), (b, opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
        for group in ref.param_groups:
            group["lr"] = rate
        ref.step()
        if step == 0 or settings["momentum"] == 0:
            for group in opt.param_groups:
                group["lr"] = rate
            opt.step()  # the eager first step creates the momentum buffers, as GraphedStep's warm-up does
        else:
            assert ours.ready()
            lr[torch.float64].fill_(rate)
            ours.step(lr)
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14, msg=n)
        if settings["momentum"]:
            torch.testing.assert_close(opt.state[q]["momentum_buffer"], ref.state[p]["momentum_buffer"], msg=n)


def test_graphed_step_trains_as_the_eager_step() -> None:
    """Warm-up, capture and replays, and an eager step for a batch of another shape, with the
    graph's work run eagerly (capture=False): the run's weights, BatchNorm statistics and
    momentum follow the engine's ordinary step."""
    a, b = model_pair()
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    ref = torch.optim.SGD(param_groups(a, 5e-4), lr=0.1, momentum=0.9, nesterov=True)
    opt = torch.optim.SGD(param_groups(b, 5e-4), lr=0.1, momentum=0.9, nesterov=True)
    step = GraphedStep(b, crit, opt, lambda cache=True: nullcontext(), capture=False)
    g = torch.Generator().manual_seed(2)
    # a smaller batch at the end of the warm-up (the capture waits for a full one) and after the capture
    sizes = [8] * (WARMUP_STEPS - 1) + [5] + [8] * 4 + [5] + [8] * 2
    for i, n in enumerate(sizes):
        x, y = torch.randn(n, 1, 28, 28, dtype=torch.float64, generator=g), torch.randint(0, 10, (n,), generator=g)
        rate = 0.1 * (i + 1) / len(sizes)
        for group in ref.param_groups:
            group["lr"] = rate
        ref.zero_grad(set_to_none=True)
        want = crit(a(x).float(), y)  # as the engine's step: the loss of the float logits
        want.backward()
        ref.step()
        loss, logits = step(x, y, rate)
        torch.testing.assert_close(loss, want)
        assert logits.shape == (n, 10)
    # warm-up (3), the full batch after the short one (it waits for a second like it), the short one after
    assert step.eager_steps == WARMUP_STEPS + 2 and step.replays == len(sizes) - WARMUP_STEPS - 2
    assert step.key is not None and step.key[0][0] == 8
    for (n, t), u in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(u, t, rtol=1e-9, atol=1e-12, msg=n)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # what the last step's checkpoint records


def test_cuda_graphs_say_where_they_do_not_apply(tiny_train_config, tmp_path) -> None:
    from reslab.engine.train import train

    assert graphs_refusal(torch.device("cuda"), False, False, 0) == ""
    assert "CUDA device" in graphs_refusal(torch.device("cpu"), False, False, 0)
    assert "torchrun" in graphs_refusal(torch.device("cuda"), True, False, 0)
    assert "compile" in graphs_refusal(torch.device("cuda"), False, True, 0)
    assert "probe_every" in graphs_refusal(torch.device("cuda"), False, False, 10)
    cumulative = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, momentum=None))
    assert "BatchNorm 1 averages cumulatively" in graphs_refusal(torch.device("cuda"), False, False, 0, cumulative)
    assert graphs_refusal(torch.device("cuda"), False, False, 0, nn.Sequential(nn.BatchNorm2d(2))) == ""
    with pytest.raises(UsageError, match="cuda_graphs: CUDA graphs need a CUDA device"):
        train(tiny_train_config(cuda_graphs=True, device="cpu"), tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
