"""A hostile user, one test per input class, across the commands: unknown names, bad numbers, bad
paths, damaged weights / checkpoints / summaries / grid files, bad images and arrays, bad config
files, races on one folder, write failures, and SIGINT / SIGKILL mid-run.

Each refusal must give the documented exit status (2), one line on stderr without a traceback, and
leave every existing file byte for byte as it was (checksums before and after). The tests share one
tiny trained run (module fixture) so that the suite stays well under two minutes."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from patience import HANG_S
from reslab.cli import main

pytestmark = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file(),
    reason="needs the fashion-mnist files (apt-get install dataset-fashion-mnist)",
)

TINY = ["--model", "resnet8", "--width", "0.25", "--train-subset", "256", "--val-size", "200", "--threads", "1"]


def train_argv(out: Path, *extra: str, epochs: int = 1) -> list[str]:
    return ["train", "--out", str(out), "--epochs", str(epochs), "--batch-size", "64", *TINY, "-q", *extra]


def checksums(root: Path) -> dict[str, str]:
    """Every file under ``root`` (lock files included), by content."""
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], *roots: Path, status: int = 2) -> str:
    """Run ``reslab argv`` in process: the exit status, one line on stderr naming the problem, no
    traceback, and nothing under ``roots`` changed. Returns the line."""
    before = [checksums(r) for r in roots]
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = int(e.code or 0)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == status, (rc, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert [checksums(r) for r in roots] == before, f"{argv} changed files"
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished tiny run (1 epoch), its fused file beside it."""
    root = tmp_path_factory.mktemp("hostile")
    run = root / "run"
    assert main(train_argv(run)) == 0
    assert main(["fuse", str(run), "--out", str(root / "fused.safetensors")]) == 0
    return root


def copy_run(trained: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained / "run", dst)
    return dst


# -- unknown names ------------------------------------------------------------------------------


def test_unknown_names(tmp_path: Path, capsys: pytest.CaptureFixture[str], trained: Path) -> None:
    line = refused(["train", "--out", str(tmp_path / "a"), "--technique", "nope", "-q"], capsys, tmp_path)
    assert "nope" in line
    assert "resnet7x" in refused(["train", "--out", str(tmp_path / "a"), "--model", "resnet7x"], capsys, tmp_path)
    assert "nope" in refused(["compare", "--techniques", "nope", "--out", str(tmp_path / "c")], capsys, tmp_path)
    assert "nope" in refused(["probe", "--techniques", "nope", "--out", str(tmp_path / "p")], capsys, tmp_path)
    assert "nope" in refused(["describe", "resnet8", "--technique", "nope"], capsys, tmp_path)
    assert "preset" in refused(["compare", "--preset", "nope", "--out", str(tmp_path / "c")], capsys, tmp_path)
    run = trained / "run"
    refused(["export", str(run), "--format", "nope", "--out", str(tmp_path / "m")], capsys, trained, tmp_path)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


# -- bad numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--epochs", "-1"],
        ["train", "--epochs", "ten"],
        ["train", "--lr", "abc"],
        ["train", "--batch-size", "0"],
        ["compare", "--seeds", "a"],
        ["compare", "--alpha", "2"],
        ["compare", "--margin", "-1"],
        ["compare", "--budget", "soon"],
        ["probe", "--depths", "7"],
        ["describe", "resnet8", "--width", "-1"],
    ],
)
def test_bad_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    if argv[0] in ("train", "compare", "probe"):
        argv = [*argv, "--out", str(tmp_path / "out")]
    refused(argv, capsys, tmp_path)
    assert not (tmp_path / "out").exists()


# -- bad paths ----------------------------------------------------------------------------------


def test_bad_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str], trained: Path) -> None:
    missing = tmp_path / "missing"
    assert "missing" in refused(["report", str(missing)], capsys, tmp_path)
    assert "missing" in refused(["fuse", str(missing), "--out", str(tmp_path / "f.safetensors")], capsys, tmp_path)
    refused(["export", str(missing), "--format", "torchscript", "--out", str(tmp_path / "m.pt")], capsys, tmp_path)
    refused(["predict", str(missing), str(tmp_path)], capsys, tmp_path)
    refused(["train", "--config", str(missing / "c.yaml"), "--out", str(tmp_path / "o")], capsys, tmp_path)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    refused(train_argv(a_file / "run"), capsys, tmp_path)
    refused(train_argv(a_file), capsys, tmp_path)  # --out is a file
    # an existing fused file is not replaced without --overwrite
    fused = trained / "fused.safetensors"
    refused(["fuse", str(trained / "run"), "--out", str(fused)], capsys, trained)


# -- damaged weights, checkpoints, summaries, grid files ----------------------------------------


def test_damaged_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str], trained: Path) -> None:
    run = copy_run(trained, tmp_path)
    w = run / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 3])
    assert "model.safetensors" in refused(
        ["fuse", str(run), "--out", str(tmp_path / "f.safetensors")], capsys, tmp_path
    )
    refused(["predict", str(w), str(w)], capsys, tmp_path)
    refused(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "m.pt")], capsys, tmp_path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    refused(["fuse", str(junk), "--out", str(tmp_path / "g.safetensors")], capsys, tmp_path)
    assert not (tmp_path / "f.safetensors").exists() and not (tmp_path / "g.safetensors").exists()


def test_damaged_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str], trained: Path) -> None:
    """Both checkpoints of an interrupted run damaged: --resume names the fix that exists."""
    run = copy_run(trained, tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    for p in (run / "checkpoint").glob("epoch-*.pt"):
        p.write_bytes(b"PK\x03\x04 truncated")
    line = refused(train_argv(run, "--resume", epochs=1), capsys, tmp_path)
    assert "damaged" in line and "--overwrite" in line


def synthetic_grid(root: Path) -> Path:
    """A results folder of finished made-up runs (tests/synthetic.py): baseline and scale, 3 seeds."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from synthetic import write_grid, write_run

    write_grid(root, ["baseline", "scale"])
    for s in range(3):
        write_run(root, "baseline", s, [0.5, 0.8])
        write_run(root, "scale", s, [0.5, 0.81])
    return root


@pytest.mark.parametrize(
    ("text", "named"),
    [('{"status": "compl', "not valid JSON"), ('{"status": "completed", "test_acc": "high"}', "test_acc 'high'")],
)
def test_damaged_summaries(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, named: str) -> None:
    """Torn JSON, or a value of the wrong kind: the report names the file and what is wrong with it."""
    root = synthetic_grid(tmp_path / "grid")
    (root / "runs" / "resnet8-scale-s1" / "summary.json").write_text(text)
    line = refused(["report", str(root)], capsys, root)
    assert "summary.json" in line and named in line


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("techniques", ["baseline", "nope"], "nope"),
        ("seeds", ["a"], "seeds"),
        ("train.epochs", "ten", "epochs"),
        ("error_rate", "family", "error_rate"),
        ("sequential", {"min_seeds": "six"}, "sequential"),
    ],
)
def test_damaged_grid_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: object, named: str
) -> None:
    """A hand-edited grid.json: compare and report both refuse it, naming the file and the key,
    and the file is unchanged byte for byte (compare used to rewrite it first)."""
    root = synthetic_grid(tmp_path / "grid")
    grid = json.loads((root / "grid.json").read_text())
    if key.startswith("train."):
        grid["train"][key.split(".", 1)[1]] = value
    else:
        grid[key] = value
    (root / "grid.json").write_text(json.dumps(grid))
    line = refused(["report", str(root)], capsys, root)
    assert "grid.json" in line and named in line
    line = refused(
        [
            "compare",
            "--models",
            "resnet8",
            "--techniques",
            "scale,norm",
            "--seeds",
            "3",
            "--out",
            str(root),
            "--set",
            "train_subset=256",
        ],
        capsys,
        root,
    )
    assert "grid.json" in line


# -- bad images and arrays ----------------------------------------------------------------------


def test_bad_images_and_arrays(tmp_path: Path, capsys: pytest.CaptureFixture[str], trained: Path) -> None:
    fused = trained / "fused.safetensors"
    fake = tmp_path / "cat.png"
    fake.write_text("not an image")
    assert "cat.png" in refused(["predict", str(fused), str(fake)], capsys, tmp_path, trained)
    import numpy as np

    wrong = tmp_path / "batch.npy"
    np.save(wrong, np.zeros((2, 5, 5, 5, 5), dtype=np.float32))
    refused(["predict", str(fused), str(wrong)], capsys, tmp_path, trained)
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    refused(["predict", str(fused), str(pickled)], capsys, tmp_path, trained)  # never unpickled


# -- bad config files ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["epochs: [1, 2", "not_an_option: 3\n", "epochs: ten\n", "- 1\n- 2\n"])
def test_bad_config_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    assert "c.yaml" in refused(["train", "--config", str(cfg), "--out", str(tmp_path / "o")], capsys, tmp_path)
    assert "c.yaml" in refused(["compare", "--config", str(cfg), "--out", str(tmp_path / "g")], capsys, tmp_path)
    assert not (tmp_path / "o").exists() and not (tmp_path / "g").exists()


# -- races on one folder ------------------------------------------------------------------------


def race_argv(out: Path, technique: str, seed: int) -> list[str]:
    """A training long enough (a few seconds) that the second start lands while the first trains."""
    argv = [sys.executable, "-m", "reslab", *train_argv(out, "--technique", technique, "--seed", str(seed), epochs=2)]
    argv[argv.index("--train-subset") + 1] = "1024"
    return argv


def _spawn(out: Path, technique: str, seed: int) -> subprocess.Popen[str]:
    return subprocess.Popen(race_argv(out, technique, seed), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("busy", [False, True])
def test_two_trainings_on_one_folder_never_both_succeed(tmp_path: Path, busy: bool) -> None:
    """Started 0.3 s apart on one --out (beside a busy loop, or not): one trains, the other exits 2
    naming the holder and touches nothing; the survivor's results are complete."""
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = tmp_path / "run"
        first = _spawn(out, "baseline", 0)
        time.sleep(0.3)
        second = _spawn(out, "scale", 1)
        results = [(p.wait(timeout=HANG_S), *p.communicate()) for p in (first, second)]
    finally:
        if loop is not None:
            loop.kill()
            loop.wait()
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    lines = [x for x in loser[2].splitlines() if x.strip()]
    assert len(lines) == 1 and "being trained right now by process" in lines[0] and "Traceback" not in loser[2]
    winner = 0 if results[0][0] == 0 else 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["technique"] == ("baseline", "scale")[winner]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and (out / "model.safetensors").is_file()


# -- write failures -----------------------------------------------------------------------------


def _limited(argv: list[str], limit_bytes: int) -> subprocess.CompletedProcess[str]:
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    # no bytecode: under the limit CPython would cache a truncated .pyc (its raw write returns short
    # without an error) and every later import of that module would fail
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "reslab", *argv],
        capture_output=True,
        text=True,
        timeout=HANG_S,
        preexec_fn=cap,
        env=env,
    )


def test_write_failures_name_the_file_and_leave_nothing_partial(tmp_path: Path, trained: Path) -> None:
    """Past a file-size limit (RLIMIT_FSIZE, as `ulimit -f` sets it), train, fuse, export and report
    exit 2 with one line naming the file that could not be written, and no partial file is left
    under a final name."""
    limit = 20_000  # smaller than any weights file, larger than the JSON and YAML records
    cases = {
        "train": (train_argv(tmp_path / "t"), str(tmp_path / "t"), tmp_path / "t"),
        "fuse": (["fuse", str(trained / "run"), "--out", str(tmp_path / "f.safetensors")], "f.safetensors", None),
        "export": (
            ["export", str(trained / "run"), "--format", "torchscript", "--out", str(tmp_path / "m.pt")],
            "m.pt",
            None,
        ),
    }
    report_root = tmp_path / "rep"
    shutil.copytree(trained, report_root / "runs", ignore=shutil.ignore_patterns("fused.safetensors"))
    cases["report"] = (["report", str(report_root)], "", report_root)
    for name, (argv, named, _) in cases.items():
        done = _limited(argv, limit)
        lines = [x for x in done.stderr.splitlines() if x.strip()]
        assert done.returncode == 2, (name, done.stderr[-2000:])
        assert len(lines) == 1 and "Traceback" not in done.stderr, (name, done.stderr)
        assert "could not write" in lines[0] and named in lines[0] and "ulimit -f" in lines[0], (name, lines[0])
    assert not (tmp_path / "f.safetensors").exists() and not (tmp_path / "m.pt").exists()
    # nothing half-written under a final name: every file there is whole (no temporary left either)
    assert not list(tmp_path.rglob(".*.tmp"))
    for p in (tmp_path / "t").rglob("*.safetensors"):
        from safetensors.torch import load_file

        load_file(str(p))


# -- SIGINT and SIGKILL mid-run -----------------------------------------------------------------


def test_sigint_and_sigkill_mid_run(tmp_path: Path) -> None:
    """Ctrl-C: exit 130, one line saying how to go on, the run marked interrupted. kill -9: nothing
    can be said, and --resume finishes the run from its checkpoint."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "reslab", *train_argv(out, epochs=3)]
    argv[argv.index("--train-subset") + 1] = "2048"
    for sig in (signal.SIGINT, signal.SIGKILL):
        proc = subprocess.Popen(
            [*argv, *(["--resume"] if sig == signal.SIGKILL else [])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline and not list((out / "checkpoint").glob("epoch-*.json")):
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=HANG_S)
        if sig == signal.SIGINT:
            lines = [x for x in err.splitlines() if x.strip()]
            assert proc.returncode == 130 and len(lines) == 1 and "Traceback" not in err, err
            assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
        else:
            assert proc.returncode == -signal.SIGKILL
    done = subprocess.run([*argv, "--resume"], capture_output=True, text=True, timeout=HANG_S)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
