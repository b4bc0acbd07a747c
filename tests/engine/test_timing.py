"""The timing pass runs on the grid's device and says which device that was."""

from __future__ import annotations

import pytest
import torch

from reslab.engine.devices import cpu_name, describe_device, pick_device, pick_precision
from reslab.engine.timing import measure_step_times


def _tiny(**kw):
    return measure_step_times(["resnet8"], ["baseline"], (1, 8, 8), 10, batch_size=4, width=0.25, rounds=1, **kw)


def test_timing_on_the_cpu_records_the_cpu_and_its_threads() -> None:
    timing = _tiny(threads=1, device="cpu")
    dev = timing["device"]
    assert dev["type"] == "cpu"
    assert dev["threads"] == 1
    assert dev["name"] == cpu_name() and dev["name"]
    assert dev["torch"] == torch.__version__
    assert timing["settings"]["precision"] == "fp32"
    assert len(timing["steps"]["resnet8/baseline"]) == 1
    # CUDA graphs are a CUDA feature: asked for on the CPU, the pass times eager steps and says so
    assert timing["settings"]["cuda_graphs"] is False
    assert _tiny(threads=1, device="cpu", cuda_graphs=True)["settings"]["cuda_graphs"] is False


def test_auto_without_cuda_is_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_precision("auto", pick_device("auto")) == "fp32"
    assert _tiny(device="auto")["device"]["type"] == "cpu"


def test_cuda_asked_for_without_a_gpu_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from reslab.errors import UsageError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="no CUDA GPU"):
        pick_device("cuda")


def test_precision_follows_the_engine_rule() -> None:
    assert pick_precision("auto", torch.device("cuda")) == "bf16"
    assert pick_precision("auto", torch.device("cpu")) == "fp32"
    assert pick_precision("bf16", torch.device("cpu")) == "bf16"


def test_bf16_on_the_cpu_times_under_autocast() -> None:
    timing = _tiny(device="cpu", precision="bf16", channels_last=False)
    assert timing["settings"]["precision"] == "bf16"
    assert timing["settings"]["channels_last"] is False
    assert timing["steps"]["resnet8/baseline"][0] > 0


def test_describe_device_names_the_cpu_with_threads() -> None:
    rec = describe_device(torch.device("cpu"), 3)
    assert rec["type"] == "cpu" and rec["threads"] == 3


@pytest.mark.cuda
def test_timing_on_cuda_records_the_card() -> None:
    timing = _tiny(device="cuda")
    dev = timing["device"]
    assert dev["type"] == "cuda"
    assert dev["name"] == torch.cuda.get_device_name(dev["index"])
    assert timing["settings"]["precision"] == "bf16"
    graphed = _tiny(device="cuda", cuda_graphs=True, steps=3)
    assert graphed["settings"]["cuda_graphs"] is True and graphed["steps"]["resnet8/baseline"][0] > 0


def test_the_recorded_layout_is_the_one_that_ran() -> None:
    # resnet8 at width 0.25 has a 4 -> 8 channel 1x1 stride-2 shortcut: NCHW on the CPU
    assert _tiny(device="cpu")["settings"]["channels_last"] is False
    wide = measure_step_times(["resnet8"], ["baseline"], (1, 8, 8), 10, batch_size=4, width=1.0, rounds=1)
    assert wide["settings"]["channels_last"] is True
