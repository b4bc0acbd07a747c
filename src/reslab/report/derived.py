"""The machine-readable files a report is drawn from, and their one writer: results.jsonl
(one record per run), summary.csv (per model and technique) and decisions.json."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reslab.files import atomic_write_text
from reslab.report.aggregate import (
    SUMMARY_COLUMNS,
)
from reslab.study.decisions import Decision
from reslab.study.regime import Regime


def write_derived_files(
    out: Path, records: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], decisions: Sequence[Decision]
) -> tuple[Path, Path]:
    """results.jsonl, summary.csv and decisions.json; returns the first two."""
    results_jsonl = out / "results.jsonl"
    atomic_write_text(results_jsonl, "".join(json.dumps(r, sort_keys=False) + "\n" for r in records))
    summary_csv = out / "summary.csv"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: _csv_value(row.get(k)) for k in SUMMARY_COLUMNS})
    atomic_write_text(summary_csv, buf.getvalue())
    atomic_write_text(out / DECISIONS_FILE, json.dumps([decision_record(d) for d in decisions], indent=1) + "\n")
    return results_jsonl, summary_csv


def has_records(out: Path) -> bool:
    """Whether ``out`` holds a results.jsonl with at least one record (a copied report)."""
    try:
        return any(line.strip() for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines())
    except (OSError, UnicodeDecodeError):
        return False


def decision_rows(decisions: Sequence[Decision]) -> list[dict[str, Any]]:
    """decisions.json's records as plain JSON values (tuples as lists, a number that does not exist as None)."""
    return json.loads(json.dumps([decision_record(d) for d in decisions]))


#: the decision table, machine-readable (one object per model x technique)
DECISIONS_FILE = "decisions.json"


def decision_record(d: Decision) -> dict[str, Any]:
    """One decisions.json object (JSON has no NaN: missing numbers are null)."""
    rec = {
        "model": d.model,
        "technique": d.technique,
        "decision": d.decision,
        "open_because": d.why_open or None,
        "reason": d.reason,
        "basis": d.outcome.basis if d.outcome else None,
        "seeds": d.seeds,
        "trained": d.trained,
        "max_seeds": d.max_seeds,
        "sequential": d.sequential,
        "alpha": d.alpha,
        "error_rate": d.error_rate,
        "row_level": d.level,
        "margin": d.margin,
        "per_look_level": d.nominal,
        "diff_mean": d.estimate,
        "diff_low": d.low,
        "diff_high": d.high,
        "finished_pairs": d.pairs,
        "detectable_diff": d.detectable,
        "seeds_needed": d.seeds_needed,
        "p_better": d.p_better.estimate if d.p_better else None,
        "p_better_low": d.p_better.low if d.p_better else None,
        "p_better_high": d.p_better.high if d.p_better else None,
        "diverged": d.diverged,
        "baseline_diverged": d.base_diverged,
        "technique_failed": d.tech_failed,
        "failure_rate_bound": d.fail_bound,
        "baseline_acc": d.base_acc,
        "chance_acc": d.chance,
        "params_ratio": d.params_ratio,
        "flops_ratio": d.flops_ratio,
        "step_time_ratio": d.step[0] if d.step else None,
        "convergence": d.convergence,
        "regime": _regime_record(d.regime),
        "recommendation": d.recommendation,
    }
    return _json_safe(rec)


def _regime_record(r: Regime | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return {
        "label": r.label,
        "early_training": r.early,
        "epochs": r.epochs,
        "steps": r.steps,
        "baseline_end_val_acc": r.end_acc,
        "baseline_rise_last_quarter": r.rise,
        "rise_low": r.rise_low,
        "rise_high": r.rise_high,
        "seeds": r.seeds,
        "reference": str(r.reference.path) if r.reference else None,
        "reference_val_acc": r.reference.val_acc if r.reference else None,
        "gap_to_reference": r.gap,
    }


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    return v


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        if math.isinf(v):
            return "inf"
        return f"{v:.6g}"
    return "" if v is None else v
