"""The core CLI commands, run as a user runs them (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import reslab
from patience import HANG_S


def reslab_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reslab", *args], capture_output=True, text=True, timeout=HANG_S)


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


def _help_entries(command: str) -> dict[str, str]:
    """``reslab COMMAND --help`` as option -> its help text (whitespace collapsed)."""
    import os
    import re

    env = {**os.environ, "COLUMNS": "200"}
    r = subprocess.run(
        [sys.executable, "-m", "reslab", command, "--help"], capture_output=True, text=True, timeout=HANG_S, env=env
    )
    assert r.returncode == 0, r.stderr
    options = r.stdout.split("\noptions:\n", 1)[1]
    entries = {}
    for entry in re.split(r"\n  (?=-)", "\n" + options):
        words = entry.split()
        if words:
            entries[words[0].rstrip(",")] = " ".join(words)
    return entries


@pytest.mark.parametrize("command", ["train", "compare"])
def test_help_shows_every_training_option_with_its_real_default(command: str) -> None:
    """The options are generated from TrainConfig's fields: every field with help text is an
    option of 'train' (compare offers a few), and its help states the default a run uses."""
    import re
    from dataclasses import fields

    from reslab.engine.config import TrainConfig

    defaults = TrainConfig()  # the values a run gets for options left out
    entries = _help_entries(command)
    with_help = [f.name for f in fields(TrainConfig) if f.metadata.get("help")]
    # all but technique_args (--technique-arg) and pack (set by the packed engine, not an option)
    assert {f.name for f in fields(TrainConfig)} - set(with_help) == {"technique_args", "pack"}
    offered = with_help
    if command == "compare":
        # compare offers some training options directly (the rest through --set); its own
        # options may share a field's name with another meaning (--workers: launcher workers)
        from reslab.cli.commands.compare import _TRAIN_OPTIONS

        offered = [n for n in with_help if n in _TRAIN_OPTIONS]
    shown = [n for n in offered if "--" + n.replace("_", "-") in entries]
    if command == "train":
        assert shown == with_help
    else:
        assert {"epochs", "lr", "batch_size", "dataset", "width"} <= set(shown)
    for name in shown:
        text = entries["--" + name.replace("_", "-")]
        value = getattr(defaults, name)
        m = re.search(r"\(default: ([^ )]+)", text)
        if value is None:  # no default to state: the help says what leaving it out does
            assert m is None and ("unset" in text or "without it" in text), text
        elif isinstance(value, bool):
            assert m and m.group(1) == ("on" if value else "off"), text
        else:
            assert m and type(value)(m.group(1)) == value, text
    if command == "train":
        assert "(default: 10)" in entries["--epochs"] and "(default: 0.0005)" in entries["--weight-decay"]
        assert (
            entries["--nesterov"].startswith("--nesterov, --no-nesterov") and "(default: on)" in entries["--nesterov"]
        )
