"""reslab report on synthetic run folders written in the run-folder format of docs/architecture.md.

The runs are made up so that every figure in summary.csv can be checked by hand; the real
end-to-end grid (real training) is in tests/test_compare.py.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from scipy import stats as sps

from reslab.cli import main
from reslab.engine.runs import write_json
from reslab.errors import UsageError
from reslab.report.build import build_report
from reslab.study import stats
from reslab.study.gridfile import write_grid_file
from reslab.study.results import collect
from synthetic import SEEDS, read_summary, write_grid, write_run, write_sequential_grid


@pytest.fixture
def grid_dir(tmp_path: Path) -> Path:
    root = tmp_path / "res"
    write_grid(root, ["baseline", "scale"])
    # baseline reaches 0.85 at epoch 3 in every seed; scale at epoch 2 (seeds 0, 1) and 1 (seed 2)
    base = {0: [0.70, 0.80, 0.86], 1: [0.72, 0.81, 0.87], 2: [0.71, 0.82, 0.88]}
    scale = {0: [0.75, 0.85, 0.88], 1: [0.76, 0.86, 0.89], 2: [0.85, 0.87, 0.90]}
    for s in SEEDS:
        write_run(root, "baseline", s, base[s], images_per_s=1000, params=1000, flops=50_000)
        write_run(root, "scale", s, scale[s], images_per_s=900, params=1010, flops=50_000)
    return root


def test_summary_figures_match_hand_computation(grid_dir: Path) -> None:
    files = build_report(grid_dir)
    assert not files.missing
    rows = read_summary(grid_dir)
    b, s = rows["baseline"], rows["scale"]
    # test acc = last val acc: baseline 0.86/0.87/0.88 -> mean 0.87, sd 0.01, t CI 0.87 +- 4.302653*0.01/sqrt3
    assert float(b["test_acc_mean"]) == pytest.approx(0.87)
    assert float(b["test_acc_std"]) == pytest.approx(0.01, rel=1e-4)
    assert float(b["test_acc_ci_high"]) == pytest.approx(0.87 + 4.302653 * 0.01 / math.sqrt(3), rel=1e-5)
    # paired differences 0.02, 0.02, 0.02: zero spread. The old rule claimed the difference exactly (an
    # interval [+2.00, +2.00]); ties decide nothing now (issue 18), and the row says so
    assert float(s["test_acc_diff"]) == pytest.approx(0.02)
    assert s["decision"] == "undecided (max seeds)" and s["test_acc_diff_ci_low"] == ""
    # the summary's accuracy difference and speed-up are the decision's, not a second computation
    (d,) = json.loads((grid_dir / "decisions.json").read_text())
    assert float(s["test_acc_diff"]) == pytest.approx(d["diff_mean"])
    assert float(s["speedup_epochs"]) == pytest.approx(d["convergence"]["speedup"], rel=1e-5)
    # Epochs to 0.85, interpolated between the evaluations around the crossing (the curve starts at 0
    # here, no chance level recorded): baseline 2 + 0.05/0.06, 2 + 0.04/0.06, 2 + 0.03/0.06; scale
    # exactly 2, 1 + 0.09/0.10, 1 + 0.85/0.85 = 1. Seconds are 10 per epoch, so 10x those.
    b_ep = [2 + 0.05 / 0.06, 2 + 0.04 / 0.06, 2 + 0.03 / 0.06]
    s_ep = [2.0, 1.9, 1.0]
    logs = [math.log(b / m) for b, m in zip(b_ep, s_ep, strict=True)]
    gm = math.exp(sum(logs) / 3)
    assert float(s["speedup_seconds"]) == pytest.approx(gm, rel=1e-5)
    lo, hi = sps.t.interval(0.95, 2, loc=sum(logs) / 3, scale=sps.sem(logs))
    assert float(s["speedup_seconds_ci_low"]) == pytest.approx(math.exp(lo), rel=1e-5)
    assert float(s["speedup_seconds_ci_high"]) == pytest.approx(math.exp(hi), rel=1e-5)
    # one definition of convergence: the summary's median epochs are the decision table's
    assert s["reached"] == "3" and float(s["epochs_to_target_median"]) == pytest.approx(1.9)
    assert float(s["epochs_to_target_median"]) == pytest.approx(d["convergence"]["epochs_median"])
    assert float(b["seconds_to_target_median"]) == pytest.approx(10 * b_ep[1], rel=1e-5)  # csv: 6 digits
    # AUC = mean val acc per epoch: baseline seed 0 (0.70+0.80+0.86)/3
    aucs = [(0.70 + 0.80 + 0.86) / 3, (0.72 + 0.81 + 0.87) / 3, (0.71 + 0.82 + 0.88) / 3]
    assert float(b["auc_mean"]) == pytest.approx(sum(aucs) / 3, rel=1e-5)
    assert float(s["params_ratio"]) == pytest.approx(1.01)
    assert float(s["throughput_ratio"]) == pytest.approx(0.9)
    assert s["interval_method"] == "t"
    assert "test_acc_diff_p_holm" not in s  # no second test on another table (issue 18)
    # results.jsonl: one record per run with its own figures
    recs = [json.loads(x) for x in (grid_dir / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 6
    r = next(x for x in recs if x["technique"] == "scale" and x["seed"] == 2)
    assert r["epochs_to_target"] == 1 and r["seconds_to_target"] == 10.0 and r["status"] == "completed"
    r = next(x for x in recs if x["technique"] == "scale" and x["seed"] == 1)
    assert r["epochs_to_target"] == pytest.approx(1.9) and r["seconds_to_target"] == pytest.approx(19.0)


def test_the_epochs_speedup_is_computed_once_by_the_decision(grid_dir: Path) -> None:
    from reslab.report.aggregate import summarize_all
    from reslab.report.build import gather

    g = gather(grid_dir)
    (d,) = g.decisions
    row = next(r for r in g.rows if r["technique"] == "scale")
    # epochs to 0.85 by hand (see test_summary_figures_match_hand_computation): baseline / scale per seed
    b_ep, s_ep = [2 + 0.05 / 0.06, 2 + 0.04 / 0.06, 2 + 0.03 / 0.06], [2.0, 1.9, 1.0]
    gm = math.exp(sum(math.log(b / m) for b, m in zip(b_ep, s_ep, strict=True)) / 3)
    assert row["speedup_epochs"] == d.convergence["speedup"] == pytest.approx(gm)
    assert row["speedup_pairs"] == d.convergence["pairs"] == 3
    # the summary alone leaves the epochs speed-up to the decision: nothing computes a second one
    alone = next(r for r in summarize_all(g.records, g.grid, g.targets, g.method) if r["technique"] == "scale")
    assert math.isnan(alone["speedup_epochs"]) and math.isnan(alone["speedup_epochs_ci_low"])
    assert alone["speedup_pairs"] == 0
    assert alone["speedup_seconds"] == row["speedup_seconds"] == pytest.approx(gm)


def test_report_files_and_verdict_words(grid_dir: Path) -> None:
    files = build_report(grid_dir)
    md = files.report_md.read_text()
    html = files.report_html.read_text()
    assert "Complete grid" in md
    assert "- scale: " in md and "ties decide nothing" in md
    # speed-up interval is wide with 3 seeds and contains 1 -> no claim
    assert "no difference shown" in md and "faster" not in md
    for fig in ("decisions.png", "curves-epoch.png", "curves-time.png", "time-to-target.png"):
        assert (grid_dir / "figures" / fig).stat().st_size > 5000
        assert f"figures/{fig}" in md
    # the decision plot comes first, before the verdict table
    assert md.index("figures/decisions.png") < md.index("| model | technique | verdict |") < md.index("## Details")
    assert html.count("data:image/png;base64,") == 4 and "<table>" in html
    assert "Not measured" in md  # no gradients.jsonl


def test_no_significant_difference_when_interval_contains_zero(tmp_path: Path) -> None:
    root = tmp_path / "r"
    write_grid(root, ["baseline", "norm"], target=0.99)
    for s, (a, b) in enumerate([(0.88, 0.885), (0.89, 0.884), (0.87, 0.872)]):
        write_run(root, "baseline", s, [0.5, a])
        write_run(root, "norm", s, [0.5, b])
    build_report(root)
    row = read_summary(root)["norm"]
    assert row["decision"] == "undecided (max seeds)"
    assert float(row["test_acc_diff_ci_low"]) < 0 < float(row["test_acc_diff_ci_high"])
    md = (root / "report.md").read_text()
    (d,) = json.loads((root / "decisions.json").read_text())
    assert "clears neither 0 nor the margin" in d["reason"]
    assert "| resnet8 | norm | undecided (max seeds) |" in md and "no answer" in md
    assert "| norm | 0/3 | not reached | not reached | too few seeds reached the target |" in md


def test_incomplete_grid_names_what_is_missing(tmp_path: Path) -> None:
    root = tmp_path / "r"
    write_grid(root, ["baseline", "scale", "fusion"])
    for s in SEEDS:
        write_run(root, "baseline", s, [0.8, 0.86])
    write_run(root, "scale", 0, [0.8, 0.87])
    write_run(root, "scale", 1, [0.8], status="running", epochs=2)  # killed after epoch 1
    files = build_report(root)
    md = files.report_md.read_text()
    assert "Incomplete grid: 4 of 9 runs finished" in md
    assert "resnet8 / scale / seed 1: interrupted after epoch 1 of 2" in md
    assert "resnet8 / scale / seed 2: not started" in md
    assert "resnet8 / fusion / seed 0: not started" in md
    rows = read_summary(root)
    assert "fusion" not in rows  # nothing to summarise, but listed as missing
    assert rows["scale"]["completed"] == "1" and rows["scale"]["unfinished"] == "2"
    assert "| resnet8 | scale | undecided (too few seeds) |" in md and "too few finished seeds" in md


def test_diverged_run_is_reported_and_excluded_from_accuracy(tmp_path: Path) -> None:
    root = tmp_path / "r"
    write_grid(root, ["baseline", "fusion"])
    for s in SEEDS:
        write_run(root, "baseline", s, [0.8, 0.86])
    write_run(root, "fusion", 0, [0.8, 0.87])
    write_run(root, "fusion", 1, [0.8, 0.88])
    write_run(root, "fusion", 2, [0.1], status="diverged", epochs=2)
    build_report(root)
    row = read_summary(root)["fusion"]
    assert row["diverged"] == "1" and row["completed"] == "2"
    assert float(row["test_acc_mean"]) == pytest.approx(0.875)
    assert row["reached"] == "2" and row["reached_of"] == "3"
    md = (root / "report.md").read_text()
    # verdict table: 2 finished pairs are too few for an interval; the failure is counted
    assert "| resnet8 | fusion | undecided (max seeds) | +1.50 (no interval) | 3 | 1 of 3 |" in md
    assert "| fusion | 2/1/0 | 87.50 ± " in md  # its own accuracy, over the 2 that finished


def test_gradients_are_plotted_when_present(tmp_path: Path) -> None:
    root = tmp_path / "r"
    write_grid(root, ["baseline", "norm"], seeds=(0,))
    grads = [{"step": 10, "grad_norms": [1.0, 2.0, 4.0]}, {"step": 20, "grad_norms": [1.0, 8.0]}]
    write_run(root, "baseline", 0, [0.8, 0.86], gradients=grads)
    write_run(root, "norm", 0, [0.8, 0.86], gradients=[{"step": 10, "grad_norms": [1e-3, 1.0]}])
    files = build_report(root)
    rows = read_summary(root)
    assert float(rows["baseline"]["worst_grad_ratio"]) == 8.0
    assert float(rows["norm"]["worst_grad_ratio"]) == pytest.approx(1000.0)
    assert (root / "figures" / "gradients.png").exists() and "Gradient health" in files.report_md.read_text()


def test_bootstrap_interval_is_refused_below_the_n_where_it_holds_its_level(grid_dir: Path, tmp_path: Path) -> None:
    """At 3 seeds a nominal 95% percentile bootstrap covers ~74% (tests/test_stats.py): refused."""
    with pytest.raises(UsageError, match="bootstrap needs at least 20 seeds"):
        build_report(grid_dir, method="bootstrap")
    root = tmp_path / "many"
    seeds = range(stats.BOOTSTRAP_MIN_N)
    write_grid(root, ["baseline", "scale"], seeds=seeds)
    for s in seeds:
        write_run(root, "baseline", s, [0.70, 0.80, 0.86])
        # log speed-ups ln 1.5 (epoch 2 vs 3) or ln 3 (epoch 1): the interval lies within [1.5, 3]
        write_run(root, "scale", s, [0.85, 0.87, 0.90] if s % 3 == 2 else [0.75, 0.85, 0.88])
    build_report(root, method="bootstrap")
    row = read_summary(root)["scale"]
    assert row["interval_method"] == "bootstrap"
    # descriptive intervals follow --interval; the speed-up in seconds is one (10 s per epoch)
    assert 1.5 - 1e-9 <= float(row["speedup_seconds_ci_low"]) <= float(row["speedup_seconds_ci_high"]) <= 3 + 1e-9
    assert "paired percentile bootstrap" in (root / "report.md").read_text()


def test_merging_two_shard_folders(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    write_grid(a, ["baseline", "scale"], seeds=(0, 1))
    write_grid(b, ["baseline", "scale"], seeds=(0, 1))
    write_run(a, "baseline", 0, [0.86])
    write_run(a, "scale", 0, [0.87])
    write_run(b, "baseline", 1, [0.85])
    write_run(b, "scale", 1, [0.88])
    write_run(b, "scale", 0, [0.5], status="running")  # an unfinished copy never replaces a finished one
    files = build_report(a, extra_dirs=[b])
    assert not files.missing
    assert float(read_summary(a)["scale"]["test_acc_mean"]) == pytest.approx(0.875)
    _, runs = collect([a, b])
    assert len(runs) == 4


def test_a_technique_with_too_few_seeds_makes_no_claim(tmp_path: Path) -> None:
    """One paired seed: no interval, so the row is undecided and neither its advice nor its plot label
    claims anything about accuracy."""
    root = tmp_path / "g"
    write_grid(root, ["baseline", "scale"], seeds=[0])
    write_run(root, "baseline", 0, [0.5, 0.8])
    write_run(root, "scale", 0, [0.5, 0.9])
    build_report(root)
    md = (root / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| resnet8 | scale |"))
    assert "undecided (too few seeds)" in row
    advice = next(line for line in md.splitlines() if line.startswith("- scale:"))
    assert "too few finished seeds" in advice and "faster" not in advice and "better" not in advice


def test_cli_report_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no run folders found" in capsys.readouterr().err


def test_cli_report_regenerates(grid_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(grid_dir), "--target-acc", "0.8", "--interval", "t"]) == 0
    assert float(read_summary(grid_dir)["baseline"]["target_acc"]) == 0.8
    out = capsys.readouterr().out
    assert "report.md" in out
    # the verdict table, a line per row, as decisions.json has it
    rows = json.loads((grid_dir / "decisions.json").read_text())
    lines = [line for line in out.splitlines() if line.startswith("resnet8 ")]
    assert rows and lines
    assert [line.split(":")[0] for line in lines] == [f"resnet8 {r['technique']}" for r in rows]
    assert all(line.split(": ")[1].split(",")[0].startswith(r["decision"]) for line, r in zip(lines, rows, strict=True))


def test_lower_sections_tell_the_decision_tables_story(tmp_path: Path) -> None:
    """The old report applied Holm to its own t-tests below a decision table that applied nothing, so
    a technique could be 'better' above and 'a lead to confirm' below (issue 18). Now every section
    quotes the one decision, with the same interval."""
    root = tmp_path / "r"
    write_grid(root, ["baseline", "scale", "norm", "fusion"], target=0.99)
    base = [0.880, 0.890, 0.870]
    finals = {
        "scale": [0.900, 0.915, 0.885],  # +0.020, +0.025, +0.015
        "norm": [0.885, 0.884, 0.872],
        "fusion": [0.875, 0.893, 0.871],
    }
    for s in SEEDS:
        write_run(root, "baseline", s, [0.5, base[s]])
        for tech, acc in finals.items():
            write_run(root, tech, s, [0.5, acc[s]])
    build_report(root)
    rows = read_summary(root)
    md = (root / "report.md").read_text()
    assert "Holm" not in md and "p (Holm)" not in md
    for d in json.loads((root / "decisions.json").read_text()):
        iv = f"[{100 * d['diff_low']:+.2f}, {100 * d['diff_high']:+.2f}]"
        assert md.count(iv) == 1, (d["technique"], iv)  # the verdict table's, stated once
        assert rows[d["technique"]]["decision"].startswith(d["decision"])
        assert d["error_rate"] == "table" and d["row_level"] == pytest.approx(0.05 / 3)


def test_init_probe_file_is_reported(grid_dir: Path) -> None:
    entries = [
        {"model": "resnet8", "technique": "baseline", "blocks": 3, "grad_ratio": 1.5, "verdict": "healthy"},
        {"model": "resnet8", "technique": "scale", "blocks": 3, "grad_ratio": 2.0e6, "verdict": "exploding"},
    ]
    (grid_dir / "probe-init.json").write_text(json.dumps({"entries": entries}))
    files = build_report(grid_dir)
    rows = read_summary(grid_dir)
    assert float(rows["scale"]["init_grad_ratio"]) == 2.0e6 and rows["scale"]["init_grad_verdict"] == "exploding"
    md = files.report_md.read_text()
    # a results folder of reslab 0.1 (probe entries without depth) still reads: the verdict table has
    # the word at this depth, the details the ratio
    assert md.split("| model | technique |", 1)[1].split("\n")[2].endswith("| exploding |")
    assert "| resnet8 | scale | exploding (2e+06) |" in md


def test_report_without_run_folders_never_overwrites_stored_results(grid_dir: Path) -> None:
    build_report(grid_dir)
    import shutil

    shutil.rmtree(grid_dir / "runs")  # e.g. the committed example report: derived files only
    before = (grid_dir / "report.md").read_text()
    with pytest.raises(UsageError, match="no run folders"):
        build_report(grid_dir)
    assert (grid_dir / "report.md").read_text() == before


def test_several_models_get_their_own_sections_and_figures(tmp_path: Path) -> None:
    root = tmp_path / "r"
    write_grid(root, ["baseline", "norm"], seeds=(0, 1))
    grid = json.loads((root / "grid.json").read_text())
    grid["models"] = ["resnet8", "resnet14"]
    write_grid_file(root, grid)
    for model in ("resnet8", "resnet14"):
        for s in (0, 1):
            write_run(root, "baseline", s, [0.8, 0.86 + 0.01 * s], model=model)
            write_run(root, "norm", s, [0.8, 0.85 + 0.02 * s], model=model)
    files = build_report(root)
    with open(root / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["technique"]) for r in rows] == [
        ("resnet8", "baseline"),
        ("resnet8", "norm"),
        ("resnet14", "baseline"),
        ("resnet14", "norm"),
    ]
    md = files.report_md.read_text()
    assert "## Details: resnet8" in md and "## Details: resnet14" in md
    assert (root / "figures" / "decisions.png").exists()  # one decision plot, both models in it
    for model in ("resnet8", "resnet14"):
        assert (root / "figures" / f"curves-epoch-{model}.png").exists()
        assert (root / "figures" / f"time-to-target-{model}.png").exists()


def test_decision_table_gives_every_label_from_stored_runs(tmp_path: Path) -> None:
    """Synthetic final test accuracies, chosen so each technique lands on one label; the
    decision is read off the stored runs exactly as the sequential grid took it."""
    root = tmp_path / "seq"
    write_sequential_grid(root, ["baseline", "up", "down", "same", "noisy", "short"])
    base = [0.850, 0.860, 0.855, 0.852, 0.858]
    acc = {
        # tight: at 3 seeds (2 degrees of freedom) the rule's intervals, calibrated up to skewness 2
        # over the looks at a table's share of 0.05, are about 70 spreads wide
        "up": [b + d for b, d in zip(base, [0.020, 0.02003, 0.01997], strict=False)],  # decided at 3 seeds
        "down": [b - d for b, d in zip(base, [0.030, 0.03003, 0.02997], strict=False)],
        "same": [b + d for b, d in zip(base, [0.0002, -0.0002, 0.0001, 0.0], strict=False)],  # equivalent at 4
        "noisy": [b + d for b, d in zip(base, [0.01, -0.01, 0.004, -0.006, 0.008], strict=True)],  # all 5 seeds
        "short": [b + d for b, d in zip(base, [0.01, -0.01, 0.004], strict=False)],  # stopped (budget) at 3
    }
    for s, b in enumerate(base):
        write_run(root, "baseline", s, [0.8, b], test_acc=b)
    for tech, vals in acc.items():
        for s, v in enumerate(vals):
            write_run(root, tech, s, [0.8, v], test_acc=v)
    build_report(root)
    dec = {d["technique"]: d for d in json.loads((root / "decisions.json").read_text())}
    assert (dec["up"]["decision"], dec["up"]["seeds"]) == ("better", 3)
    assert (dec["down"]["decision"], dec["down"]["seeds"]) == ("worse", 3)
    assert (dec["same"]["decision"], dec["same"]["seeds"]) == ("equivalent", 4)
    assert (dec["noisy"]["decision"], dec["noisy"]["open_because"], dec["noisy"]["seeds"]) == (
        "undecided",
        "max seeds",
        5,
    )
    assert (dec["short"]["decision"], dec["short"]["open_because"]) == ("undecided", "budget or interrupted")
    assert dec["up"]["diff_low"] > 0 and dec["down"]["diff_high"] < 0
    assert -0.005 < dec["same"]["diff_low"] and dec["same"]["diff_high"] < 0.005
    assert "re-run the same command" in dec["short"]["recommendation"]
    # P(beats baseline in a seed): 3 of 3 wins, exact Clopper-Pearson lower bound 0.025^(1/3)
    assert dec["up"]["p_better"] == 1.0 and dec["up"]["p_better_low"] == pytest.approx(0.025 ** (1 / 3))
    md = (root / "report.md").read_text()
    # the report opens with the answer
    assert md.index("## Answer") < md.index("## Details") < md.index("## Settings") < md.index("## How to read")
    assert "**better**" in md and "**worse**" in md and "**equivalent**" in md and "undecided (max seeds)" in md


def test_diverged_runs_are_failures_not_chance_level_accuracies(tmp_path: Path) -> None:
    """The old rule counted a diverged run at chance level and called 3 of 3 diverged seeds 'worse'
    through a t interval. Divergence is its own outcome now: three failures in three seeds are not yet
    significant under the exact test (the bound at a table's level needs more seeds), so the row stays
    undecided, says how often it diverged, and is never equivalent or better."""
    root = tmp_path / "div"
    write_sequential_grid(root, ["baseline", "boom"])
    for s in range(3):
        write_run(root, "baseline", s, [0.8, 0.85 + 0.002 * s], test_acc=0.85 + 0.002 * s)
        run = write_run(root, "boom", s, [0.3], status="diverged")
        summary = json.loads((run / "summary.json").read_text())
        summary["chance_acc"] = 0.1
        write_json(run / "summary.json", summary)
    build_report(root)
    (d,) = json.loads((root / "decisions.json").read_text())
    assert (d["decision"], d["seeds"], d["diverged"], d["baseline_diverged"]) == ("undecided", 3, 3, 0)
    assert d["diff_mean"] is None  # no seed where both finished
    md = (root / "report.md").read_text()
    assert "diverged in 3 of 3 seeds where baseline did not" in d["reason"]
    assert "| resnet8 | boom | undecided (open: re-run to continue) | n/a | 3 of 5 | 3 of 3 |" in md
    assert "| boom | 0/3/1 | n/a |" in md
    assert "fails where baseline does not, so it is never equivalent or better" in md
