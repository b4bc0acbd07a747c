"""What a user sees when a path, an option or the machine gets in the way: one line naming
the problem and the fix, exit status 2, no traceback, nothing existing damaged."""

from __future__ import annotations

import pytest

from reslab.cli import main

TINY = ["--model", "resnet8", "--width", "0.25", "--epochs", "1", "--batch-size", "64", "--train-subset", "128"]
TINY += ["--val-size", "64", "--threads", "1", "--quiet"]


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"reslab {command}: error: ")
    return lines[0]


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_train_data_dir_without_dataset_exits_2(tmp_path, capsys, kind):
    given = tmp_path / "data"
    if kind == "empty":
        given.mkdir()
    out = tmp_path / "run"
    assert main(["train", *TINY, "--data-dir", str(given), "--out", str(out)]) == 2
    line = _one_line_error(capsys, "train")
    assert f"--data-dir {given}" in line
    assert ("does not exist" if kind == "missing" else "train-images-idx3-ubyte") in line
    assert not out.exists()  # no config.yaml recording the wrong folder


# ---------------------------------------------------------------------------------------
# Outputs that cannot be written: refused before the work, as an unprivileged user (root
# may write anywhere, so the tests drop to 'nobody' for a real permission denial)

import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from patience import HANG_S  # noqa: E402

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _nobody_can_run() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run a command as 'nobody'"
    try:
        r = subprocess.run(
            [sys.executable, "-c", "import reslab.cli"],
            user="nobody",
            env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
            cwd="/",
            capture_output=True,
            timeout=HANG_S,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot run as nobody ({e})"
    return None if r.returncode == 0 else "'nobody' cannot read this checkout or its Python"


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_train_config):
    """A folder every user can read, holding a finished run, and a read-only folder 'ro'
    (root's, 0555) holding a copy of that run."""
    why = _nobody_can_run()
    if why:
        pytest.skip(why)
    from reslab.engine.train import train

    base = Path(tempfile.mkdtemp(prefix="reslab-perm-", dir="/tmp"))
    base.chmod(0o755)
    old = os.umask(0o022)
    try:
        run = base / "run"
        assert train(tiny_train_config(epochs=1, train_subset=128, val_size=64), run, progress=False)["status"] == (
            "completed"
        )
        (base / "home").mkdir(mode=0o777)
        (base / "home").chmod(0o777)
        ro = base / "ro"
        ro.mkdir()
        shutil.copytree(run, ro / "run")
        ro.chmod(0o555)
        (ro / "run").chmod(0o555)
        (base / "afile").write_text("a file, not a folder\n")
        yield base
    finally:
        os.umask(old)
        for p in (base / "ro", base / "ro" / "run"):
            if p.exists():
                p.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


def _as_nobody(base: Path, *argv: str, timeout: float = HANG_S) -> subprocess.CompletedProcess[str]:
    home = base / "home"
    env = {
        "PYTHONPATH": SRC,
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / "cache"),
        "MPLCONFIGDIR": str(home / "mpl"),
    }
    return subprocess.run(
        [sys.executable, "-m", "reslab", *argv],
        user="nobody",
        env=env,
        cwd=str(home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _check_one_line(r: subprocess.CompletedProcess[str], command: str) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"reslab {command}: error: ")
    return lines[0]


# Each of these would work for minutes (or longer) if it started before checking --out.
READ_ONLY_CASES = {
    "train": ["train", "--epochs", "50", "--out", "{ro}/new-run", "--quiet"],
    "compare": ["compare", "--out", "{ro}/results", "--quiet"],
    "probe": ["probe", "--depths", "218,218", "--batches", "50", "--out", "{ro}/probe", "--no-progress"],
    "fuse": ["fuse", "{run}", "--out", "{ro}/fused.safetensors"],
    "export": ["export", "{run}", "--format", "exported", "--out", "{ro}/m.pt2"],
    "report": ["report", "{ro}/run"],
}


@pytest.mark.parametrize("command", list(READ_ONLY_CASES))
def test_read_only_output_is_refused_before_the_work(world, command):
    before = (world / "ro" / "run" / "model.safetensors").read_bytes()
    argv = [a.format(ro=world / "ro", run=world / "run") for a in READ_ONLY_CASES[command]]
    r = _as_nobody(world, *argv, timeout=HANG_S)
    line = _check_one_line(r, command)
    assert "cannot write in" in line and str(world / "ro") in line and "permission" in line
    assert sorted(p.name for p in (world / "ro").iterdir()) == ["run"]  # nothing created
    assert (world / "ro" / "run" / "model.safetensors").read_bytes() == before  # nothing damaged
    assert not (world / "ro" / "run" / "report").exists()


@pytest.mark.parametrize("command", ["train", "compare", "probe", "fuse", "export"])
def test_a_file_in_the_way_of_out(world, command, capsys):
    argv = [a.format(ro=world / "afile", run=world / "run") for a in READ_ONLY_CASES[command]]
    assert main(argv) == 2
    line = _one_line_error(capsys, command)
    assert f"{world / 'afile'} is a file" in line
    assert (world / "afile").read_text() == "a file, not a folder\n"


@pytest.mark.parametrize("command", ["train", "compare", "probe"])
def test_out_naming_an_existing_file(world, command, capsys):
    argv = [a.format(ro=world, run=world / "run") for a in READ_ONLY_CASES[command]]
    argv[argv.index("--out") + 1] = str(world / "afile")
    assert main(argv) == 2
    assert f"{world / 'afile'} is a file" in _one_line_error(capsys, command)
    assert (world / "afile").read_text() == "a file, not a folder\n"


def test_unreadable_inputs_as_nobody(world):
    secret = world / "secret.png"
    shutil.copy(world / "afile", secret)
    secret.chmod(0o600)  # root's; nobody cannot read it
    conf = world / "secret.yaml"
    conf.write_text("epochs: 1\n")
    conf.chmod(0o600)
    r = _as_nobody(world, "train", "--config", str(conf), "--out", str(world / "home" / "r"))
    line = _check_one_line(r, "train")
    assert str(conf) in line and "permission denied" in line.lower()
    r = _as_nobody(world, "describe", "resnet8")  # sanity: nobody runs reslab at all
    assert r.returncode == 0, r.stderr


def test_os_errors_during_work_are_one_line(monkeypatch, capsys):
    import reslab.cli.commands.describe as describe_cmd

    def fail(args):
        raise PermissionError(13, "Permission denied", "/data/somewhere/file.bin")

    monkeypatch.setattr(describe_cmd, "run", fail)
    assert main(["describe", "resnet8"]) == 2
    line = _one_line_error(capsys, "describe")
    assert line.endswith("/data/somewhere/file.bin: permission denied; check its permissions or choose another path")


def test_out_of_memory_names_the_batch_size(tmp_path, monkeypatch, capsys):
    import reslab.engine.train as train_mod

    def oom(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123456789 bytes.")

    monkeypatch.setattr(train_mod, "train", oom)
    assert main(["train", "--batch-size", "96", "--out", str(tmp_path / "r")]) == 2
    line = _one_line_error(capsys, "train")
    assert "out of memory at batch size 96" in line and "--batch-size (e.g. 48)" in line
