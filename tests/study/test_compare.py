"""reslab compare: real (tiny) grids on real Fashion-MNIST images, end to end.

Every grid here trains resnet8 at quarter width on a small fixed subset for 1-2 epochs, so a
run takes about a second of compute; what is tested is the grid machinery (files, pairing,
resume after a real kill, divergence, shards, jobs), not accuracy.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grids import tiny_args, wait_for
from patience import HANG_S
from reslab.cli import main
from reslab.errors import UsageError
from reslab.report.aggregate import SUMMARY_COLUMNS
from reslab.study.grid import Grid, parse_shard, prepare_results, shard_cells


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_grid_end_to_end_with_shards_and_jobs(tmp_path: Path) -> None:
    out = tmp_path / "res"
    # two shards into one folder: the first with 2 worker processes, the second in-process
    assert main(tiny_args(out, "--shard", "1/2", "--jobs", "2", "--set", "probe_every=4", probe=True)) == 0
    assert len(records(out)) == 2  # the report after shard 1 covers its half ...
    assert "Incomplete grid: 2 of 4 runs finished" in (out / "report.md").read_text()
    assert main(tiny_args(out, "--shard", "2/2", "--jobs", "1", "--set", "probe_every=4")) == 0
    recs = records(out)
    assert sorted((r["technique"], r["seed"]) for r in recs) == [
        ("baseline", 0),
        ("baseline", 1),
        ("scale", 0),
        ("scale", 1),
    ]
    assert all(r["status"] == "completed" and 0 < r["test_acc"] <= 1 for r in recs)
    for r in recs:
        run = out / r["run_dir"]
        for f in ("config.yaml", "metrics.jsonl", "summary.json", "model.safetensors", "gradients.jsonl"):
            assert (run / f).is_file(), f
    # paired seeds: runs of one seed differ only in the technique
    import yaml

    cfgs = {(r["technique"], r["seed"]): yaml.safe_load((out / r["run_dir"] / "config.yaml").read_text()) for r in recs}
    diff = {k for k in cfgs["baseline", 1] if cfgs["baseline", 1][k] != cfgs["scale", 1][k]}
    assert diff - {"threads"} == {"technique"}  # threads: shard 1 ran 2 jobs x 1 thread, shard 2 1 x 2
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["technique"] for r in rows] == ["baseline", "scale"]
    assert list(rows[0]) == SUMMARY_COLUMNS
    scale = rows[1]
    # the accuracy difference is the decision's (issue 18): no p-value of a second test
    for key in ("test_acc_mean", "test_acc_ci_low", "decision", "auc_mean", "params_ratio"):
        assert scale[key] != "", key
    assert float(scale["params_ratio"]) > 1.0  # one scalar per block
    assert scale["worst_grad_ratio"] != ""
    md = (out / "report.md").read_text()
    # gradient flow at init, measured once for every technique by reslab.probe
    assert rows[0]["init_grad_verdict"] == "healthy" and float(rows[0]["init_grad_ratio"]) >= 1.0
    # ... at the grid's model and at 56 and 110 layers (the grid's width), in reslab.probe's format
    probe = json.loads((out / "probe-init.json").read_text())
    assert {(e["technique"], e["depth"], e["width"]) for e in probe["results"]} == {
        (t, d, 0.25) for t in ("baseline", "scale") for d in (8, 56, 110)
    }
    assert "| scale | healthy (" in md and "reslab.probe at width 0.25" in md  # one row per depth probed
    assert "Complete grid: all 4 runs finished" in md and "\n- scale: " in md  # the technique's advice
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5  # decisions, curves x2, time to target, gradients
    for fig in ("decisions.png", "curves-epoch.png", "curves-time.png", "time-to-target.png", "gradients.png"):
        assert (out / "figures" / fig).stat().st_size > 5000
    # re-running the finished grid trains nothing and keeps every result
    before = (out / recs[0]["run_dir"] / "summary.json").read_bytes()
    assert main(tiny_args(out, "--set", "probe_every=4")) == 0
    assert (out / recs[0]["run_dir"] / "summary.json").read_bytes() == before


@pytest.mark.slow
def test_resume_after_killing_the_grid(tmp_path: Path) -> None:
    out = tmp_path / "res"
    args = [sys.executable, "-m", "reslab", *tiny_args(out, "--jobs", "1", seeds="1", epochs=3)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    first = out / "runs" / "resnet8-baseline-s0"
    second = out / "runs" / "resnet8-scale-s0"

    def second_mid_run() -> bool:
        try:
            return json.loads((second / "checkpoint" / "latest.json").read_text())["epoch"] >= 1
        except (OSError, ValueError, KeyError):
            return False

    wait_for(second_mid_run, proc)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: the worst case
    proc.wait()
    assert json.loads((first / "summary.json").read_text())["status"] == "completed"
    assert json.loads((second / "summary.json").read_text())["status"] == "running"
    first_files = {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()}
    killed_rows = [json.loads(x) for x in (second / "metrics.jsonl").read_text().splitlines()]

    # the report reads the killed grid and says what is missing
    assert main(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "Incomplete grid: 1 of 2 runs finished" in md
    assert "resnet8 / scale / seed 0: running after epoch" in md

    # the same command again: the finished run is kept byte for byte, the killed one resumes
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert res.returncode == 0, res.stderr
    assert "1 run trained (0 diverged), 1 already finished" in res.stdout
    assert {p.name: p.read_bytes() for p in first.iterdir() if p.is_file()} == first_files
    rows = [json.loads(x) for x in (second / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    wall = ("epoch_s", "elapsed_s", "images_per_s")
    for before, after in zip(killed_rows, rows, strict=False):  # resumed, not restarted
        assert {k: v for k, v in before.items() if k not in wall} == {k: v for k, v in after.items() if k not in wall}
    assert all(r["status"] == "completed" for r in records(out))


@pytest.mark.slow
def test_diverged_run_is_recorded_and_the_grid_goes_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "res"
    # a learning rate of 1e6 overflows the first steps: every run diverges, each one is recorded
    assert main(tiny_args(out, "--lr", "1e6", "--jobs", "1", seeds="1")) == 0
    recs = records(out)
    assert [r["status"] for r in recs] == ["diverged", "diverged"]
    assert all(r["diverged_epoch"] == 1 and r["test_acc"] is None for r in recs)
    md = (out / "report.md").read_text()
    assert "| resnet8 | scale | undecided (too few seeds) | n/a | 1 | 1 of 1 |" in md  # its failure counted
    assert "| scale | 0/1/0 | n/a |" in md
    assert "2 runs trained (2 diverged)" in capsys.readouterr().out
    # a diverged run is a finished result: re-running does not train it again
    assert main(tiny_args(out, "--lr", "1e6", "--jobs", "1", seeds="1")) == 0
    assert "0 runs trained (0 diverged), 2 already finished" in capsys.readouterr().out


def test_shards_partition_the_grid() -> None:
    g = Grid(["resnet8", "resnet14"], ["baseline", "scale", "norm"], [0, 1, 2, 3, 4], {})
    cells = g.cells()
    for n in (1, 2, 3, 7):
        parts = [shard_cells(cells, (i, n)) for i in range(1, n + 1)]
        assert sorted(c for p in parts for c in p) == sorted(cells)  # every cell once
        assert sum(len(p) for p in parts) == len(cells)
    assert shard_cells(cells, (2, 3)) == shard_cells(list(cells), (2, 3))  # deterministic
    # with estimated costs the parts are balanced: a paper-like grid where a resnet110 cell
    # costs 6x a resnet20 cell (issue 12's measurement); round robin would give one part
    # all the deep cells here, since the two models alternate in cell order
    g = Grid(["resnet20", "resnet110"], ["baseline", "scale", "norm"], list(range(4)), {})
    cells = g.cells()

    def cost(c):
        return 6.0 if c.model == "resnet110" else 1.0

    def loads(parts):
        return [sum(cost(c) for c in p) for p in parts]

    for n in (2, 3, 5):
        parts = [shard_cells(cells, (i, n), cost) for i in range(1, n + 1)]
        assert sorted(c for p in parts for c in p) == sorted(cells)
        assert max(loads(parts)) <= 4 / 3 * max(sum(loads(parts)) / n, 6.0)  # LPT's guarantee
        assert parts == [shard_cells(list(cells), (i, n), cost) for i in range(1, n + 1)]  # deterministic
    rr = [shard_cells(cells, (i, 2)) for i in (1, 2)]
    lpt = [shard_cells(cells, (i, 2), cost) for i in (1, 2)]
    assert max(loads(lpt)) / min(loads(lpt)) < 1.1 < max(loads(rr)) / min(loads(rr))
    assert parse_shard("2/3") == (2, 3)
    for bad in ("0/2", "3/2", "1-2", "x"):
        with pytest.raises(UsageError, match="--shard must be i/n"):
            parse_shard(bad)


def test_results_folder_with_other_settings_is_refused(tmp_path: Path) -> None:
    g = Grid(["resnet8"], ["baseline"], [0], {"epochs": 2, "train_subset": 100})
    prepare_results(tmp_path / "r", g)
    before = (tmp_path / "r" / "grid.json").read_text()
    with pytest.raises(UsageError, match=r"epochs=3 \(stored: 2\)"):
        prepare_results(tmp_path / "r", Grid(["resnet8"], ["baseline"], [0], {"epochs": 3, "train_subset": 100}))
    assert (tmp_path / "r" / "grid.json").read_text() == before
    # more seeds and techniques extend the grid
    merged = prepare_results(tmp_path / "r", Grid(["resnet8"], ["baseline", "scale"], [0, 1], g.train))
    assert merged.techniques == ["baseline", "scale"] and merged.seeds == [0, 1]
    (tmp_path / "r" / "grid.json").write_text('{"models": 1}')
    with pytest.raises(UsageError, match=r"grid.json: models is 1; it must be a non-empty list of names"):
        prepare_results(tmp_path / "r", g)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not a 'reslab compare' results folder"):
        prepare_results(tmp_path / "other", g)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "0"], "--seeds takes N >= 1"),
        (["--seeds", "1,1"], "lists a seed twice"),
        (["--techniques", "baseline,nope"], "unknown technique"),
        (["--target-acc", "90"], "--target-acc is a fraction"),
        (["--set", "lr"], "--set takes KEY=VALUE"),
        (["--set", "bogus=1"], "unknown option"),
        (["--set", "seed=3"], "seed is set per run by the grid"),
        (["--models", "resnet9"], "unknown model"),
        (["--epochs", "0"], "epochs must be at least 1"),
        (["--shard", "3/2"], "--shard must be i/n"),
        # once written only after the init probe and into the timing pass
        pytest.param(
            ["--device", "cuda"],
            "device cuda was asked for but no CUDA GPU is available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible here"),
        ),
    ],
)
def test_usage_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["compare", "--out", str(tmp_path / "r"), "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "r").exists()  # nothing written before the settings are valid


def test_presets_and_custom_grids() -> None:
    from reslab.cli import build_parser
    from reslab.cli.commands.compare import build_grid
    from reslab.study.packing import refusal, seeds_at_once

    parse = build_parser().parse_args
    grid, jobs, out = build_grid(parse(["compare"]))
    assert grid.preset == "quick" and out == "results/quick" and jobs == 2
    assert grid.models == ["resnet8", "resnet56"] and grid.techniques == ["baseline", "scale", "norm", "fusion"]
    assert grid.plan() is not None and grid.plan().looks == (6,) and len(grid.cells()) == 2 * 4 * 6
    grid, _, out = build_grid(parse(["compare", "--preset", "paper"]))
    assert grid.models == ["resnet20", "resnet56", "resnet110"]
    assert grid.techniques == ["baseline", "scale", "norm", "fusion"]  # the article's three
    assert len(grid.cells()) == 3 * 4 * 9 and "train_subset" not in grid.train
    # each look is one pack of 3 seeds per technique, and nothing in the settings refuses a pack
    assert grid.plan() is not None and grid.plan().looks == (3, 6, 9)
    assert seeds_at_once(grid) == 3 and refusal(grid.config(grid.cells()[0])) == ""
    # an option without --preset starts from the engine's defaults, not from quick's subset
    grid, jobs, out = build_grid(parse(["compare", "--epochs", "15", "--techniques", "scale"]))
    assert grid.preset is None and out == "results/compare" and jobs == 1
    assert grid.train == {"epochs": 15} and grid.techniques == ["baseline", "scale"]
    assert grid.plan() is None and grid.seeds == [0, 1, 2]  # fixed seeds unless --until-decided
    # a preset with one setting changed keeps the rest of the preset
    grid, _, _ = build_grid(parse(["compare", "--preset", "quick", "--epochs", "6", "--set", "lr=0.05"]))
    assert grid.train["epochs"] == 6 and grid.train["lr"] == 0.05 and grid.train["train_subset"] == 4000
    assert grid.preset == "quick (modified)"
    # seed-major order: a grid stopped early still has complete paired seeds
    assert [c.seed for c in grid.cells()[:4]] == [0, 0, 0, 0]


SEQ = ("--until-decided", "--max-seeds", "3", "--no-probe", "--set", "evals_per_epoch=2", "--set", "test_subset=500")


def decisions(out: Path) -> dict[str, dict]:
    return {d["technique"]: d for d in json.loads((out / "decisions.json").read_text())}


def trained_seeds(out: Path, technique: str) -> list[int]:
    return sorted(int(p.name.rsplit("-s", 1)[1]) for p in (out / "runs").glob(f"resnet8-{technique}-s*"))


@pytest.mark.slow
def test_sequential_grid_stops_each_technique_at_its_decision_and_resumes_identically(tmp_path: Path) -> None:
    """Seeds 2 to 3: each technique trains exactly the seeds its decision needed, and a grid
    interrupted after its first finished run and re-run ends with the same decisions, figure
    for figure, as one that ran straight through (CPU training is deterministic)."""
    straight = tmp_path / "straight"
    assert main(tiny_args(straight, *SEQ, techniques="baseline,scale,norm")) == 0
    dec = decisions(straight)
    for tech in ("scale", "norm"):
        d = dec[tech]
        assert d["decision"] in ("better", "worse", "equivalent", "undecided")
        assert d["seeds"] in (2, 3) and trained_seeds(straight, tech) == list(range(d["seeds"]))
        if d["open_because"] == "nothing learned":  # tiny runs may end near chance: no more seeds help
            assert d["baseline_acc"] <= d["chance_acc"] + 0.05
        elif d["decision"] == "undecided":
            assert d["open_because"] == "max seeds" and d["seeds"] == 3
    assert trained_seeds(straight, "baseline") == list(range(max(dec[t]["seeds"] for t in ("scale", "norm"))))

    resumed = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "reslab", *tiny_args(resumed, *SEQ, techniques="baseline,scale,norm")[:]]
    # a shell's background job may inherit SIGINT ignored; the child must take Ctrl-C like a terminal's
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 300
    while time.time() < deadline and not any((resumed / "runs").glob("*/model.safetensors")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=HANG_S) == 130
    assert main(tiny_args(resumed, *SEQ, techniques="baseline,scale,norm")) == 0
    a, b = decisions(straight), decisions(resumed)
    for tech in a:
        for key in ("decision", "seeds", "diff_mean", "diff_low", "diff_high", "p_better"):
            assert a[tech][key] == b[tech][key], (tech, key)


def test_budget_stops_before_a_run_that_cannot_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "budget"
    assert main(tiny_args(out, *SEQ, "--budget", "0.01s")) == 0
    assert not (out / "runs").exists() or not any((out / "runs").iterdir())
    (d,) = decisions(out).values()
    assert (d["decision"], d["open_because"]) == ("undecided", "too few seeds")
    assert "budget" in capsys.readouterr().out


def test_sequential_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="belong to --until-decided"):
        from reslab.cli import build_parser
        from reslab.cli.commands.compare import build_grid

        build_grid(build_parser().parse_args(["compare", "--models", "resnet8", "--max-seeds", "4"]))
    with pytest.raises(SystemExit) as exc:  # no abbreviation: --seed is not --seeds
        main(["compare", "--seed", "3", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert main(tiny_args(tmp_path / "y", "--until-decided", "--budget", "soon")) == 2


def test_quick_preset_includes_a_deep_model_and_decides_sequentially() -> None:
    from reslab.nn.blocks import residual_blocks
    from reslab.nn.models import build_model
    from reslab.study.presets import PRESETS

    quick = PRESETS["quick"]
    depths = [2 * len(residual_blocks(build_model(m))) + 2 for m in quick["models"]]
    assert max(depths) >= 56 and min(depths) <= 20
    assert quick["sequential"]["min_seeds"] >= 3 and quick["budget_s"] is not None


def test_estimate_flags_a_long_cpu_grid_and_progress_prints_lines_off_a_terminal(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from reslab.study.estimate import LONG_RUN_S, Estimator, estimate_lines
    from reslab.study.outcomes import Outcomes
    from reslab.study.scheduler import GridProgress

    grid = Grid(["resnet20"], ["baseline", "scale"], [0, 1, 2], {"epochs": 15})
    # 0.15 s a step, as the timing pass measures resnet20 at batch 128 on this 2-core CPU
    timing = {"steps": {"resnet20/baseline": [0.15] * 3, "resnet20/scale": [0.155] * 3}}
    est = Estimator(grid, timing, n_train=55_000, n_eval=15 * 5000 + 10_000)
    total, words = estimate_lines(grid, est, Outcomes(), jobs=1)
    steps = 55_000 // 128 * 15
    assert total == pytest.approx(3 * (0.15 + 0.155) * (steps + 85_000 / (3 * 128)))
    assert total > LONG_RUN_S and words.startswith("estimated time")
    prog = GridProgress(enabled=True, every=0.0)  # pytest's stderr is not a terminal
    prog.update(10.0, 100.0, "2 runs done")
    assert "compare: 2 runs done; about 1m30s left" in capsys.readouterr().err


def test_the_estimate_divides_by_the_measured_pack_gain_and_counts_a_packs_share() -> None:
    from reslab.study.estimate import Estimator
    from reslab.study.results import Cell

    grid = Grid(["resnet20", "resnet56"], ["baseline"], [0, 1, 2], {"epochs": 2, "batch_size": 100})
    timing = {"steps": {"resnet20/baseline": [0.01] * 3, "resnet56/baseline": [0.03] * 3}}
    est = Estimator(grid, timing, n_train=1000, n_eval=600, pack_gain={"resnet56": 2.5})
    alone = 0.03 * (10 * 2 + 600 / (3 * 100))
    r56, r20 = Cell("resnet56", "baseline", 0), Cell("resnet20", "baseline", 0)
    assert est.seconds(r56) == pytest.approx(alone / 2.5)  # a third of a pack of 3 at 2.5x
    assert est.seconds(r20) == pytest.approx(0.01 * 22)  # no gain measured: a run's own time
    # a pack of 3 that took 3 x 0.5 of the prediction: each run's share is half its prediction
    est.observe(r56, 3 * 0.5 * alone / 2.5, pack_size=3)
    assert est.seconds(r56) == pytest.approx(0.5 * alone / 2.5)


def test_estimate_measures_and_trains_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "res"
    assert main(tiny_args(out, "--estimate")) == 0
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and said[0].startswith("this grid: estimated time ") and "this CPU" in said[0]
    assert (out / "timing.json").is_file()  # kept: the real run reuses it
    assert not (out / "runs").exists() or not any((out / "runs").iterdir())
    # the same command without --estimate trains the grid, from the measurements kept
    assert main(tiny_args(out)) == 0
    assert len(list((out / "runs").iterdir())) == 4
    # a launcher's workers run elsewhere: one line, status 2, nothing written
    assert main(tiny_args(tmp_path / "r2", "--estimate", "--launcher", "ray")) == 2
    err = capsys.readouterr().err
    assert "--estimate measures this machine" in err and "Traceback" not in err
    assert not (tmp_path / "r2").exists()


def test_one_seed_trains_and_says_it_cannot_decide(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(tiny_args(tmp_path / "one", "--no-report", seeds="1", quiet=False)) == 0
    err = capsys.readouterr().err
    assert "one seed gives no interval, so no row can be decided" in err and "--seeds 3" in err
    assert sorted(p.name for p in (tmp_path / "one" / "runs").iterdir()) == ["resnet8-baseline-s0", "resnet8-scale-s0"]
