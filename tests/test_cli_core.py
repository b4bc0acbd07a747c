"""The core CLI commands, run as a user runs them (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import reslab


def reslab_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reslab", *args], capture_output=True, text=True, timeout=120)


def test_models_lists_every_model_and_technique() -> None:
    r = reslab_cli("models")
    assert r.returncode == 0, r.stderr
    for name in reslab.list_models() + reslab.list_techniques():
        assert name in r.stdout


def test_describe_reports_overhead() -> None:
    r = reslab_cli("describe", "resnet20", "--technique", "norm", "--input-size", "1x28x28", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    # norm adds one BN (2C parameters) per block: 3 blocks at each of 16, 32, 64 channels.
    assert d["params"] - d["baseline_params"] == 2 * 3 * (16 + 32 + 64)
    assert d["flops"] == d["baseline_flops"]  # BN work is element-wise, not counted
    r = reslab_cli("describe", "resnet20", "-t", "fusion")
    assert r.returncode == 0
    assert "x baseline" in r.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (("describe", "resnet20", "--technique", "bogus"), "unknown technique 'bogus'; valid techniques: baseline"),
        (("describe", "resnet21"), "unknown model 'resnet21'"),
        (("describe", "resnet20", "--input-size", "28x28"), "--input-size must look like CxHxW"),
        (("describe", "resnet20", "--no-such-flag"), "unrecognized arguments"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args: tuple[str, ...], needle: str) -> None:
    r = reslab_cli(*args)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
