"""The numbers of a report: per-run records (results.jsonl) and per-technique statistics
(summary.csv: means, intervals, IQM, paired differences, speed-ups), from the runs that
:func:`reslab.study.results.collect` read. No text and no files: :mod:`reslab.report.sections` words
these numbers and :mod:`reslab.report` lays them out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from reslab.errors import UsageError
from reslab.study import stats
from reslab.study.curve import epochs_to_target, seconds_at
from reslab.study.decisions import auto_target, chance_of, error_rate_of, open_cells, table_outcomes
from reslab.study.plan import Plan
from reslab.study.presets import parse_target
from reslab.study.results import BASELINE, FINISHED, Cell, RunData, run_value


def as_float(x: Any) -> float:
    """A summary row's number; nan where the row has none."""
    return math.nan if x is None else float(x)


# ---------------------------------------------------------------------------------------
# Per-run records


def _relative(path: Path, base: Path | None) -> str:
    if base is not None:
        try:
            return str(path.resolve().relative_to(base.resolve()))
        except ValueError:
            pass
    return str(path)


def _num(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


#: keys of a gradients.jsonl record that are not per-block norms
_GRAD_META = frozenset({"step", "epoch", "time", "elapsed_s", "lr", "loss", "ratio"})


def _block_norms(rec: dict[str, Any]) -> list[float]:
    """Per-block gradient norms from one gradients.jsonl record.

    ``reslab train --probe-every`` writes ``{"step", "epoch", "<block name>": norm, ...}``;
    lists under ``grad_norms``/``norms``/``blocks`` are read too.
    """
    for key in ("grad_norms", "norms", "blocks"):
        v = rec.get(key)
        if isinstance(v, list) and v:
            return [_num(item.get("grad_norm", item.get("norm")) if isinstance(item, dict) else item) for item in v]
    return [_num(v) for k, v in rec.items() if k not in _GRAD_META and isinstance(v, int | float)]


def gradient_ratios(gradients: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """(steps, max/min per-block gradient norm) for each gradients.jsonl record."""
    steps, ratios = [], []
    for i, rec in enumerate(gradients):
        # blocks with an exactly zero gradient (e.g. a branch zeroed at init) have no ratio
        norms = [n for n in _block_norms(rec) if math.isfinite(n) and n > 0]
        if len(norms) < 2:
            continue
        r = max(norms) / min(norms)
        steps.append(_num(rec.get("step", i)))
        ratios.append(r)
    return steps, ratios


def _median_images_per_s(metrics: Sequence[dict[str, Any]]) -> float:
    vals = [_num(m.get("images_per_s")) for m in metrics]
    vals = [v for v in vals if math.isfinite(v) and v > 0]
    if not vals:
        return math.nan
    # The first epoch carries one-off start-up costs; leave it out when there are others.
    return float(np.median(vals[1:] if len(vals) > 2 else vals))


def run_record(run: RunData, target: float, base: Path | None = None) -> dict[str, Any]:
    """One results.jsonl record: identity, status, accuracy, convergence and cost of a run.

    ``run_dir`` is relative to ``base`` (the results folder) when inside it, so a results
    folder can be moved or copied between machines.
    """
    s, m = run.summary, run.metrics
    val_acc = [_num(r.get("val_acc")) for r in m]
    elapsed = [_num(r.get("elapsed_s")) for r in m]
    epochs_done = [int(r.get("epoch", i + 1)) for i, r in enumerate(m)]
    finite_val = [v for v in val_acc if math.isfinite(v)]
    usable = run.status == "completed"
    # The one definition of convergence (reslab.study.curve), the decision table's too: a
    # diverged run never reaches the target, since its model is not usable.
    ep_t = epochs_to_target(run, target)
    sec_t = seconds_at(run, ep_t)
    _, ratios = gradient_ratios(run.gradients)
    rec: dict[str, Any] = {
        "model": run.cell.model,
        "technique": run.cell.technique,
        "seed": run.cell.seed,
        "status": run.status,
        "run_dir": _relative(run.path, base),
        "dataset": s.get("dataset", run.config.get("dataset")),
        "epochs": s.get("epochs", run.config.get("epochs")),
        "epochs_done": epochs_done[-1] if epochs_done else 0,
        "final_val_acc": finite_val[-1] if finite_val else None,
        "best_val_acc": _num(s.get("best_val_acc")) if usable else None,
        "best_epoch": s.get("best_epoch") if usable else None,
        "test_acc": _num(s.get("test_acc")) if usable else None,
        "test_loss": _num(s.get("test_loss")) if usable else None,
        "auc": stats.curve_auc(val_acc) if usable else None,
        "target_acc": target,
        "reached_target": math.isfinite(ep_t),
        "epochs_to_target": ep_t if math.isfinite(ep_t) else None,
        "seconds_to_target": sec_t if math.isfinite(sec_t) else None,
        "elapsed_s": _num(s.get("elapsed_s", elapsed[-1] if elapsed else math.nan)),
        "images_per_s": _median_images_per_s(m),
        "params": s.get("params"),
        "flops": s.get("flops"),
        "diverged_epoch": s.get("diverged_epoch"),
        "worst_grad_ratio": max(ratios) if ratios else None,
        "error": run.error,
    }
    # JSON has no NaN: missing numbers are null.
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in rec.items()}


# ---------------------------------------------------------------------------------------
# Per-technique statistics


def _vals(records: Sequence[dict[str, Any]], key: str, seeds: Sequence[int], inf_if_none: bool = False) -> list[float]:
    """Values of ``key`` aligned to ``seeds`` (nan for a missing seed, inf for unreached if asked)."""
    by_seed = {r["seed"]: r for r in records}
    out = []
    for s in seeds:
        r = by_seed.get(s)
        v = None if r is None else r.get(key)
        if v is None:
            # A finished run without the value never reached it (diverged runs included).
            done = r is not None and r["status"] in FINISHED
            out.append(math.inf if (inf_if_none and done) else math.nan)
        else:
            out.append(float(v))
    return out


def _iv_fields(prefix: str, iv: stats.Interval) -> dict[str, float]:
    return {f"{prefix}_ci_low": iv.low, f"{prefix}_ci_high": iv.high}


def summarize_technique(
    records: Sequence[dict[str, Any]],
    base: Sequence[dict[str, Any]] | None,
    seeds: Sequence[int],
    target: float,
    method: str,
    level: float = 0.95,
) -> dict[str, Any]:
    """One summary.csv row: every metric of one model x technique over its seeds."""
    r0 = records[0]
    row: dict[str, Any] = {"model": r0["model"], "technique": r0["technique"]}
    statuses = [r["status"] for r in records]
    row["seeds_planned"] = len(seeds)
    row["completed"] = statuses.count("completed")
    row["diverged"] = statuses.count("diverged")
    row["unfinished"] = len(seeds) - row["completed"] - row["diverged"]
    for key in ("test_acc", "best_val_acc", "auc"):
        sm = stats.summarize(_vals(records, key, seeds), level)
        row[f"{key}_mean"], row[f"{key}_std"] = sm.mean, sm.std
        row.update(_iv_fields(key, sm.ci))
    # interquartile mean (robust to one odd seed) where there are at least 4 seeds to trim
    row["test_acc_iqm"] = stats.iqm(_vals(records, "test_acc", seeds))
    row["target_acc"] = target
    reached_ep = _vals(records, "epochs_to_target", seeds, inf_if_none=True)
    reached_s = _vals(records, "seconds_to_target", seeds, inf_if_none=True)
    finished = [v for v in reached_ep if not math.isnan(v)]
    row["reached"] = sum(math.isfinite(v) for v in finished)
    row["reached_of"] = len(finished)
    ep_all = finished
    s_all = [v for v in reached_s if not math.isnan(v)]
    row["epochs_to_target_median"] = stats.censored_median(ep_all)
    row["seconds_to_target_median"] = stats.censored_median(s_all)
    for key, vals in (("epochs_to_target", reached_ep), ("seconds_to_target", reached_s)):
        sm = stats.summarize([v for v in vals if math.isfinite(v)], level)
        row[f"{key}_mean"] = sm.mean
        row.update(_iv_fields(key, sm.ci))
    ips = _vals(records, "images_per_s", seeds)
    row["images_per_s"] = stats.summarize(ips, level).mean
    row["params"] = next((r["params"] for r in records if r.get("params") is not None), None)
    row["flops"] = next((r["flops"] for r in records if r.get("flops") is not None), None)
    ratios = [r["worst_grad_ratio"] for r in records if r.get("worst_grad_ratio") is not None]
    row["worst_grad_ratio"] = max(ratios) if ratios else math.nan
    row["interval_method"] = method
    # Paired comparisons with the baseline of the same model, seed by seed.
    cmp_keys = (
        "speedup_epochs",
        "speedup_seconds",
        "test_acc_diff",
        "auc_diff",
        "throughput_ratio",
    )
    for k in cmp_keys:
        row[k] = math.nan
        row[f"{k}_ci_low"] = row[f"{k}_ci_high"] = math.nan
    row["speedup_pairs"] = row["test_acc_diff_pairs"] = 0
    row["auc_diff_p"] = math.nan
    row["decision"] = ""
    row["decision_seeds"] = 0
    row["diverged_where_baseline_did_not"] = row["baseline_diverged_where_it_did_not"] = 0
    row["row_error_rate"] = math.nan
    row["params_ratio"] = row["flops_ratio"] = math.nan
    if base:
        # seconds-to-target speed-up = baseline time / technique time, on seeds where both reached the
        # target; the epochs speed-up and its pairs are the decision's convergence (apply_decisions)
        b_s = _vals(base, "seconds_to_target", seeds, inf_if_none=True)
        iv = stats.ratio_interval(b_s, reached_s, level, method)
        row["speedup_seconds"] = iv.estimate
        row.update(_iv_fields("speedup_seconds", iv))
        # the accuracy difference is the decision's (apply_decisions); AUC is described, not decided
        pt = stats.paired_test(_vals(records, "auc", seeds), _vals(base, "auc", seeds), level, method)
        row["auc_diff"] = pt.mean_diff
        row.update(_iv_fields("auc_diff", pt.ci))
        row["auc_diff_p"] = pt.p_value
        iv = stats.ratio_interval(ips, _vals(base, "images_per_s", seeds), level, method)
        row["throughput_ratio"] = iv.estimate
        row.update(_iv_fields("throughput_ratio", iv))
        bp = next((r["params"] for r in base if r.get("params")), None)
        bf = next((r["flops"] for r in base if r.get("flops")), None)
        if bp and row["params"]:
            row["params_ratio"] = row["params"] / bp
        if bf and row["flops"]:
            row["flops_ratio"] = row["flops"] / bf
    return row


SUMMARY_COLUMNS = [
    "model",
    "technique",
    "seeds_planned",
    "completed",
    "diverged",
    "unfinished",
    "test_acc_mean",
    "test_acc_std",
    "test_acc_ci_low",
    "test_acc_ci_high",
    "test_acc_iqm",
    "best_val_acc_mean",
    "best_val_acc_std",
    "best_val_acc_ci_low",
    "best_val_acc_ci_high",
    "auc_mean",
    "auc_std",
    "auc_ci_low",
    "auc_ci_high",
    "target_acc",
    "reached",
    "reached_of",
    "epochs_to_target_median",
    "seconds_to_target_median",
    "epochs_to_target_mean",
    "epochs_to_target_ci_low",
    "epochs_to_target_ci_high",
    "seconds_to_target_mean",
    "seconds_to_target_ci_low",
    "seconds_to_target_ci_high",
    "speedup_pairs",
    "speedup_epochs",
    "speedup_epochs_ci_low",
    "speedup_epochs_ci_high",
    "speedup_seconds",
    "speedup_seconds_ci_low",
    "speedup_seconds_ci_high",
    "test_acc_diff_pairs",
    "test_acc_diff",
    "test_acc_diff_ci_low",
    "test_acc_diff_ci_high",
    "decision",
    "decision_seeds",
    "diverged_where_baseline_did_not",
    "baseline_diverged_where_it_did_not",
    "row_error_rate",
    "auc_diff",
    "auc_diff_ci_low",
    "auc_diff_ci_high",
    "auc_diff_p",
    "params",
    "flops",
    "params_ratio",
    "flops_ratio",
    "images_per_s",
    "throughput_ratio",
    "throughput_ratio_ci_low",
    "throughput_ratio_ci_high",
    "worst_grad_ratio",
    "init_grad_ratio",
    "init_grad_verdict",
    "interval_method",
]


def summarize_all(
    records: Sequence[dict[str, Any]],
    grid: dict[str, Any] | None,
    target: float | dict[str, float],
    method: str,
    level: float = 0.95,
) -> list[dict[str, Any]]:
    """summary.csv rows, in grid order (models, then techniques); ``target`` may be per model."""
    models = list(dict.fromkeys([*(grid["models"] if grid else []), *(r["model"] for r in records)]))
    techs = list(dict.fromkeys([*(grid["techniques"] if grid else []), *(r["technique"] for r in records)]))
    seeds = sorted({*(int(s) for s in (grid["seeds"] if grid else [])), *(r["seed"] for r in records)})
    rows = []
    for model in models:
        base = [r for r in records if r["model"] == model and r["technique"] == BASELINE] or None
        for tech in techs:
            recs = [r for r in records if r["model"] == model and r["technique"] == tech]
            if not recs:
                continue
            tgt = target[model] if isinstance(target, dict) else target
            rows.append(summarize_technique(recs, base if tech != BASELINE else None, seeds, tgt, method, level))
    return rows


def apply_decisions(rows: Sequence[dict[str, Any]], decisions: Sequence[Any]) -> None:
    """Give each technique's summary row its decision, the decision's accuracy difference and
    interval (the rule's, at its per-look level) and its epochs-to-target speed-up (its
    convergence), so that no section of a report computes a second one that could disagree
    (:class:`reslab.study.decisions.Decision`)."""
    by_key = {(d.model, d.technique): d for d in decisions}
    for row in rows:
        d = by_key.get((row["model"], row["technique"]))
        if d is None:
            continue
        row["decision"] = d.decision + (f" ({d.why_open})" if d.why_open else "")
        row["decision_seeds"] = d.seeds
        row["test_acc_diff"], row["test_acc_diff_ci_low"], row["test_acc_diff_ci_high"] = d.estimate, d.low, d.high
        row["test_acc_diff_pairs"] = d.pairs
        row["diverged_where_baseline_did_not"] = d.diverged
        row["baseline_diverged_where_it_did_not"] = d.base_diverged
        row["row_error_rate"] = d.level
        c = d.convergence or {}
        if c:  # the one epochs speed-up (summarize_technique leaves it to the decision)
            row["speedup_epochs"], row["speedup_pairs"] = c["speedup"], c["pairs"]
            row["speedup_epochs_ci_low"], row["speedup_epochs_ci_high"] = c["low"], c["high"]


# ---------------------------------------------------------------------------------------
# What a report covers: targets, interval method, expected cells


def targets_for(
    target_acc: float | str | None, grid: dict[str, Any] | None, runs: dict[Cell, RunData], models: Sequence[str]
) -> dict[str, float]:
    """Per-model validation-accuracy target: the option, the grid's, or 'auto' (see decisions)."""
    if is_auto_target(target_acc, grid):
        return {m: auto_target(runs, m) for m in models}
    raw = target_acc if target_acc is not None else (grid or {}).get("target_acc", 0.9)
    return dict.fromkeys(models, float(parse_target(raw, 0.9)))


def is_auto_target(target_acc: float | str | None, grid: dict[str, Any] | None) -> bool:
    """Whether :func:`targets_for` derives the targets from baseline ('auto')."""
    raw = target_acc if target_acc is not None else (grid or {}).get("target_acc", 0.9)
    return isinstance(raw, str) and raw.strip().lower() == "auto"


def check_interval_method(method: str, runs: dict[Cell, RunData], models: Sequence[str]) -> str:
    """``method`` when it is a known interval method that holds its level on these runs."""
    if method not in stats.METHODS:
        raise UsageError(f"--interval must be one of {', '.join(stats.METHODS)}, got {method!r}")
    if method == "bootstrap":
        n_min = min((sum(1 for c in runs if c.model == m and c.technique == BASELINE) for m in models), default=0)
        if n_min < stats.BOOTSTRAP_MIN_N:
            raise UsageError(
                f"--interval bootstrap needs at least {stats.BOOTSTRAP_MIN_N} seeds per technique to hold its "
                f"level (its 95% interval covers about 74% of the time at 3 seeds, 83% at 5); this grid has "
                f"{n_min}: use --interval t"
            )
    return method


def expected_cells(grid: dict[str, Any] | None, cells: Sequence[Cell], runs: dict[Cell, RunData]) -> list[Cell]:
    """The cells a complete result needs: every cell of a fixed grid; for a sequential one, the
    runs that exist plus the seeds each still-open comparison needs for its next look."""
    seq = (grid or {}).get("sequential")
    if not grid or not seq:
        return list(cells)
    seeds = [int(s) for s in grid["seeds"]]
    values = {c: v for c, r in runs.items() if r.status == "completed" and (v := run_value(r)) is not None}
    status = {c: r.status for c, r in runs.items()}
    plan = Plan(**seq)
    chances = {m: chance_of([r.summary for c, r in runs.items() if c.model == m]) for m in grid["models"]}
    need = set(runs)
    outs = table_outcomes(plan, error_rate_of(grid), seeds, status, values, grid["models"], grid["techniques"], chances)
    need |= open_cells(outs, seeds)
    return sorted(need)


def add_plan_and_init_probe(
    rows: list[dict[str, Any]],
    grid: dict[str, Any] | None,
    expected: Sequence[Cell],
    runs: dict[Cell, RunData],
    init_probe: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """Complete summary rows with what the runs alone do not say: for a sequential grid,
    the seeds its plan needs (not the maximum); the gradient flow at initialisation."""
    if (grid or {}).get("sequential"):
        for row in rows:
            mine = [c for c in expected if (c.model, c.technique) == (row["model"], row["technique"])]
            row["seeds_planned"] = len(mine)
            row["unfinished"] = sum(1 for c in mine if c not in runs or not runs[c].finished)
    for row in rows:
        e = init_probe.get((row["model"], row["technique"]))
        row["init_grad_ratio"] = as_float(e.get("grad_ratio")) if e else math.nan
        row["init_grad_verdict"] = e.get("verdict") if e else None


# ---------------------------------------------------------------------------------------
# Series for the figures


def runs_by_technique(runs: dict[Cell, RunData], model: str) -> dict[str, list[RunData]]:
    """A model's runs per technique, in seed order."""
    by_tech: dict[str, list[RunData]] = {}
    for c in sorted(c for c in runs if c.model == model):
        by_tech.setdefault(c.technique, []).append(runs[c])
    return by_tech


def curves(runs: Sequence[RunData]) -> dict[str, np.ndarray]:
    """seeds x epochs matrices of val_acc, train_loss, elapsed_s (nan-padded)."""
    width = max((int(r.get("epoch", 0)) for run in runs for r in run.metrics), default=0)
    out = {}
    for key in ("val_acc", "train_loss", "elapsed_s"):
        mat = np.full((len(runs), width), np.nan)
        for i, run in enumerate(runs):
            for r in run.metrics:
                e = int(r.get("epoch", 0))
                if 1 <= e <= width:
                    mat[i, e - 1] = _num(r.get(key))
        out[key] = mat
    return out


def gradient_series(
    by_tech: dict[str, list[RunData]], order: Sequence[str]
) -> dict[str, list[tuple[list[float], list[float]]]]:
    """Per technique, each run's (steps, max/min block gradient-norm ratio) during training;
    techniques without recorded gradients left out."""
    series = {t: [gradient_ratios(run.gradients)[:2] for run in by_tech.get(t, []) if run.gradients] for t in order}
    series = {t: [s for s in v if s[0]] for t, v in series.items()}
    return {t: v for t, v in series.items() if v}
