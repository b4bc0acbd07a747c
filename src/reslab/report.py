"""Results of a technique x seed grid: per-run records, per-technique statistics, report.

Everything here reads stored run folders (``config.yaml``, ``metrics.jsonl``,
``summary.json``, ``gradients.jsonl``) and never trains, so a report regenerates at any
time, from an incomplete grid, or from the merged shards of several machines.

Layout of a results folder (written by :mod:`reslab.compare`)::

    RESULTS/
      grid.json          the grid: models, techniques, seeds, target, shared train settings
      runs/MODEL-TECHNIQUE-sSEED/   one run folder each (as ``reslab train`` writes it)
      failed/MODEL-TECHNIQUE-sSEED.json   a run that raised an unexpected error (message)
      results.jsonl      one record per run (derived; rewritten by every report)
      summary.csv        one row per model x technique (derived)
      report.md, report.html, figures/*.png
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reslab import __version__, stats
from reslab.checkpoint import atomic_write_text
from reslab.decisions import Decision, auto_target, decide, gradient_verdict, open_cells, pp
from reslab.errors import UsageError
from reslab.results import (
    BASELINE,
    FIGURES_DIR,
    FINISHED,
    GRID_FILE,
    PROBE_FILE,
    RUNS_DIR,
    TIMING_FILE,
    Cell,
    RunData,
    _read_json,
    collect,
    grid_cells,
    read_jsonl,
    run_value,
)
from reslab.sequential import Plan

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
    # A diverged run counts as never reaching the target: its model is not usable.
    ep_t, sec_t = stats.time_to_target(val_acc, elapsed, target, epochs_done) if usable else (math.inf, math.inf)
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
    row["test_acc_diff_p"] = row["auc_diff_p"] = math.nan
    row["test_acc_diff_significant"] = False
    row["params_ratio"] = row["flops_ratio"] = math.nan
    if base:
        b_ep = _vals(base, "epochs_to_target", seeds, inf_if_none=True)
        b_s = _vals(base, "seconds_to_target", seeds, inf_if_none=True)
        # speed-up = baseline time / technique time, on seeds where both reached the target
        for k, num, den in (("speedup_epochs", b_ep, reached_ep), ("speedup_seconds", b_s, reached_s)):
            iv = stats.ratio_interval(num, den, level, method)
            row[k] = iv.estimate
            row.update(_iv_fields(k, iv))
        row["speedup_pairs"] = int(
            sum(math.isfinite(a) and math.isfinite(b) for a, b in zip(b_ep, reached_ep, strict=True))
        )
        for key in ("test_acc", "auc"):
            pt = stats.paired_test(_vals(records, key, seeds), _vals(base, key, seeds), level, method)
            row[f"{key}_diff"] = pt.mean_diff
            row.update(_iv_fields(f"{key}_diff", pt.ci))
            row[f"{key}_diff_p"] = pt.p_value
            if key == "test_acc":
                row["test_acc_diff_pairs"] = pt.n
                row["test_acc_diff_significant"] = pt.significant
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
    "test_acc_diff_p",
    "test_acc_diff_p_holm",
    "test_acc_diff_significant",
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
        # Holm correction over this model's comparisons with baseline (the family of tests one report makes)
        mine = [r for r in rows if r["model"] == model]
        for r, adj in zip(mine, stats.holm([r["test_acc_diff_p"] for r in mine]), strict=True):
            r["test_acc_diff_p_holm"] = adj
    return rows


# ---------------------------------------------------------------------------------------
# Verdicts


def fmt_bounds(low: float, high: float, ref: float, scale: float = 1.0, sign: bool = False, digits: int = 2) -> str:
    """``[low, high]`` with enough digits that a bound next to ``ref`` (0 or 1) still shows
    on which side of it it lies: an interval [0.00004, 0.02] must not print as [+0.00, ...]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "n/a"
    d = digits
    while d < 6 and any(b != ref and round(b * scale, d) == ref * scale for b in (low, high)):
        d += 1
    spec = f"+.{d}f" if sign else f".{d}f"
    return f"[{format(low * scale, spec)}, {format(high * scale, spec)}]"


def _pp(x: float) -> str:
    return f"{100 * x:+.2f} pp"


def _ratio_words(x: float) -> str:
    return f"{x:.2f}x"


def verdict(row: dict[str, Any], level: float = 0.95) -> list[str]:
    """Plain-words findings for one technique, each backed by the interval next to it.

    A difference is claimed only when its interval excludes "no difference" (0 for
    accuracy, 1 for a speed-up); otherwise the sentence says there is no significant
    difference, and quotes the interval so that a reader sees how large it could be.
    """
    lvl = f"{round(100 * level)}%"
    tech = row["technique"]
    out: list[str] = []
    n_fin = row["completed"] + row["diverged"]
    if row["diverged"]:
        out.append(
            f"Diverged (non-finite loss) in {row['diverged']} of {n_fin} finished seeds; accuracy figures "
            f"below cover the {row['completed']} completed seeds only."
        )
    if row["unfinished"]:
        out.append(f"{row['unfinished']} of {row['seeds_planned']} seeds have no finished result yet.")
    if tech == BASELINE:
        if row["completed"]:
            out.append(
                f"Reference: final test accuracy {stats.fmt_pct(row['test_acc_mean'])} "
                f"({lvl} CI {stats.fmt_interval(_iv(row, 'test_acc'), 100, 2, '%')}, {row['completed']} seeds)."
            )
        return out + _gradient_words(row)
    n = row["test_acc_diff_pairs"]
    if n < 2:
        out.append(
            f"Accuracy: too few paired seeds with baseline ({n}) for an interval; no claim about accuracy is made."
        )
    else:
        d, iv, p = row["test_acc_diff"], _iv(row, "test_acc_diff"), row["test_acc_diff_p"]
        ci = f"{lvl} CI {fmt_bounds(iv.low, iv.high, 0.0, 100, sign=True)} pp, paired t p = {p:.3g}, {n} seeds"
        if row["test_acc_diff_significant"]:
            word = "higher" if d > 0 else "lower"
            text = f"Accuracy: final test accuracy is {word} than baseline by {_pp(d)} ({ci})"
            p_holm = _f(row.get("test_acc_diff_p_holm"))
            if math.isfinite(p_holm) and p_holm >= 1 - level:
                text += (
                    f"; but not after the Holm correction for the comparisons in this report (adjusted p = "
                    f"{p_holm:.3g}), so treat it as a lead to confirm with more seeds"
                )
            out.append(text + ".")
        else:
            out.append(
                f"Accuracy: no significant difference from baseline in final test accuracy "
                f"(difference {_pp(d)}, {ci}; the interval contains 0)."
            )
    target = f"{100 * row['target_acc']:.1f}%"
    if row["reached"] == 0:
        out.append(f"Convergence: no seed reached {target} validation accuracy, so no speed-up can be measured.")
    elif row["speedup_pairs"] < 2:
        out.append(
            f"Convergence: reached {target} in {row['reached']} of {row['reached_of']} seeds; fewer than 2 seeds "
            f"where both it and baseline reached it, so no speed-up is claimed."
        )
    else:
        s, iv = row["speedup_epochs"], _iv(row, "speedup_epochs")
        ci = f"{lvl} CI {fmt_bounds(iv.low, iv.high, 1.0)}, {row['speedup_pairs']} paired seeds"
        reach = f"reached {target} in {row['reached']} of {row['reached_of']} seeds"
        if iv.defined and iv.low == iv.high == 1.0:
            out.append(
                f"Convergence: {reach}, in the same epoch as baseline in each of the "
                f"{row['speedup_pairs']} paired seeds."
            )
        elif iv.defined and not iv.contains(1.0):
            word = "faster" if s > 1 else "slower"
            out.append(f"Convergence: {reach}, {_ratio_words(s)} {word} than baseline in epochs ({ci}).")
        else:
            out.append(
                f"Convergence: {reach}; no significant difference from baseline in epochs to target "
                f"(speed-up {_ratio_words(s)}, {ci}; the interval contains 1)."
            )
    cost = []
    if math.isfinite(_f(row["params_ratio"])):
        cost.append(f"{100 * (row['params_ratio'] - 1):+.1f}% parameters")
    if math.isfinite(_f(row["flops_ratio"])):
        cost.append(f"{100 * (row['flops_ratio'] - 1):+.1f}% FLOPs")
    if cost:  # time per step: the decision table and Cost section, from the dedicated timing pass
        out.append("Cost: " + ", ".join(cost) + ".")
    out += _gradient_words(row)
    return out


def _gradient_words(row: dict[str, Any]) -> list[str]:
    r, v = _f(row.get("init_grad_ratio")), row.get("init_grad_verdict")
    if not v:
        return []
    ratio = f"max/min block-output gradient ratio {r:.3g}" if math.isfinite(r) else "gradient ratio undefined"
    return [
        f"Gradient flow at initialisation, at this model's depth ({row['model']}): {v} ({ratio}); "
        "other depths are in the decision table."
    ]


def _f(x: Any) -> float:
    return math.nan if x is None else float(x)


def _iv(row: dict[str, Any], key: str) -> stats.Interval:
    est = _f(row.get(key, row.get(f"{key}_mean")))
    return stats.Interval(est, _f(row[f"{key}_ci_low"]), _f(row[f"{key}_ci_high"]), method=row["interval_method"])


# ---------------------------------------------------------------------------------------
# Document model: one list of blocks rendered both to Markdown and to HTML.


@dataclass
class Doc:
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: Iterable[str]) -> None:
        items = list(items)
        if items:
            self.blocks.append(("ul", items))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.blocks.append(("table", (list(header), [list(r) for r in rows])))

    def img(self, path: Path, rel: str, alt: str) -> None:
        self.blocks.append(("img", (path, rel, alt)))

    def markdown(self) -> str:
        out: list[str] = []
        for kind, v in self.blocks:
            if kind == "h":
                out.append("#" * v[0] + " " + v[1])
            elif kind == "p":
                out.append(v)
            elif kind == "ul":
                out.append("\n".join(f"- {i}" for i in v))
            elif kind == "table":
                header, rows = v
                lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
                lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
                out.append("\n".join(lines))
            elif kind == "img":
                out.append(f"![{v[2]}]({v[1]})")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        e = html.escape
        body: list[str] = []
        for kind, v in self.blocks:
            if kind == "h":
                body.append(f"<h{v[0]}>{e(v[1])}</h{v[0]}>")
            elif kind == "p":
                body.append(f"<p>{e(v)}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in v) + "</ul>")
            elif kind == "table":
                header, rows = v
                head = "".join(f"<th>{e(c)}</th>" for c in header)
                trs = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
            elif kind == "img":
                data = base64.b64encode(Path(v[0]).read_bytes()).decode("ascii")
                body.append(f'<figure><img alt="{e(v[2])}" src="data:image/png;base64,{data}"></figure>')
        style = (
            "body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
            "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
            "th,td{border:1px solid #bbb;padding:3px 8px;text-align:left}th{background:#eee}"
            "img{max-width:100%}figure{margin:1em 0}"
            "@media print{body{max-width:none}figure{break-inside:avoid}}"
        )
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
        )


# ---------------------------------------------------------------------------------------
# Building the report


@dataclass
class ReportFiles:
    results_jsonl: Path
    summary_csv: Path
    report_md: Path
    report_html: Path
    figures: list[Path]
    missing: list[str]


def _curves(runs: Sequence[RunData]) -> dict[str, np.ndarray]:
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


def _fmt(x: Any, spec: str = ".2f") -> str:
    v = _f(x) if not isinstance(x, str) else math.nan
    return "n/a" if not math.isfinite(v) else format(v, spec)


def _fmt_ci(row: dict[str, Any], key: str, scale: float = 1.0, spec: str = ".2f") -> str:
    # differences are judged against 0, ratios against 1: keep the side of those visible
    ref = 0.0 if key.endswith("_diff") else 1.0 if key.startswith(("speedup", "throughput")) else math.nan
    return fmt_bounds(_f(row[f"{key}_ci_low"]), _f(row[f"{key}_ci_high"]), ref, scale, sign=spec.startswith("+"))


def _expected_cells(grid: dict[str, Any] | None, cells: Sequence[Cell], runs: dict[Cell, RunData]) -> list[Cell]:
    """The cells a complete result needs: every cell of a fixed grid; for a sequential one, the
    runs that exist plus the seeds each still-open comparison needs for its next look."""
    seq = (grid or {}).get("sequential")
    if not grid or not seq:
        return list(cells)
    seeds = [int(s) for s in grid["seeds"]]
    values = {c: v for c, r in runs.items() if (v := run_value(r)) is not None}
    need = set(runs)
    for m in grid["models"]:
        need |= open_cells(Plan(**seq), seeds, values, m, grid["techniques"])
    return sorted(need)


def _describe_missing(cells: Sequence[Cell], runs: dict[Cell, RunData]) -> list[str]:
    out = []
    for c in cells:
        run = runs.get(c)
        if run is None:
            out.append(f"{c.model} / {c.technique} / seed {c.seed}: not started")
        elif run.status == "failed":
            out.append(f"{c.model} / {c.technique} / seed {c.seed}: failed ({run.error})")
        elif not run.finished:
            done = run.metrics[-1].get("epoch", 0) if run.metrics else 0
            total = run.config.get("epochs", "?")
            out.append(f"{c.model} / {c.technique} / seed {c.seed}: {run.status} after epoch {done} of {total}")
    return out


def _settings(grid: dict[str, Any] | None, runs: dict[Cell, RunData]) -> list[str]:
    cfg = dict(grid.get("train", {})) if grid else {}
    if not cfg and runs:
        cfg = next(iter(runs.values())).config
    keys = (
        "dataset",
        "epochs",
        "batch_size",
        "lr",
        "train_subset",
        "train_size",
        "val_size",
        "width",
        "optimizer",
        "schedule",
        "augment",
        "label_smoothing",
        "weight_decay",
    )
    shown = [f"{k}={cfg[k]}" for k in keys if k in cfg]
    items = []
    if grid:
        preset = f"; preset {grid['preset']}" if grid.get("preset") else ""
        seeds = ", ".join(str(s) for s in grid["seeds"])
        techs = ", ".join(grid["techniques"])
        items.append(f"Grid: models {', '.join(grid['models'])}; techniques {techs}; seeds {seeds}{preset}")
    if shown:
        items.append("Training settings: " + ", ".join(shown) + " (full settings: each run's config.yaml).")
    return items


def build_report(
    results_dir: str | Path,
    *,
    extra_dirs: Sequence[str | Path] = (),
    target_acc: float | None = None,
    method: str | None = None,
    level: float = 0.95,
) -> ReportFiles:
    """Read every run under ``results_dir`` (and ``extra_dirs``), write records, summary and report.

    ``target_acc`` and ``method`` default to what the grid was run with (grid.json), else
    0.9 and ``"t"``.
    """
    out = Path(results_dir)
    dirs = [out, *(Path(d) for d in extra_dirs)]
    grid, runs = collect(dirs)
    if not runs and read_jsonl(out / "results.jsonl"):
        # e.g. a copied report without its run folders: regenerating would replace the stored
        # figures with an empty report, so refuse rather than destroy them
        raise UsageError(
            f"{out} has results.jsonl but no run folders under {out / RUNS_DIR}; a report regenerates from the "
            "run folders, so copy them back or point at the original results folder"
        )
    cells = sorted(set(grid_cells(grid)) | set(runs)) if grid else sorted(runs)
    models_all = list(dict.fromkeys([*((grid or {}).get("models") or []), *(c.model for c in cells)]))
    targets = _targets(target_acc, grid, runs, models_all)
    method = method or (grid or {}).get("interval", "t")
    if method not in stats.METHODS:
        raise UsageError(f"--interval must be one of {', '.join(stats.METHODS)}, got {method!r}")
    if method == "bootstrap":
        n_min = min((sum(1 for c in runs if c.model == m and c.technique == BASELINE) for m in models_all), default=0)
        if n_min < stats.BOOTSTRAP_MIN_N:
            raise UsageError(
                f"--interval bootstrap needs at least {stats.BOOTSTRAP_MIN_N} seeds per technique to hold its "
                f"level (its 95% interval covers about 74% of the time at 3 seeds, 83% at 5); this grid has "
                f"{n_min}: use --interval t"
            )
    records = [run_record(runs[c], targets[c.model], out) for c in cells if c in runs]
    rows = summarize_all(records, grid, targets, method, level)
    expected = _expected_cells(grid, cells, runs)
    if (grid or {}).get("sequential"):
        # a sequential grid plans only the seeds its decisions need: count those, not the maximum
        for row in rows:
            mine = [c for c in expected if (c.model, c.technique) == (row["model"], row["technique"])]
            row["seeds_planned"] = len(mine)
            row["unfinished"] = sum(1 for c in mine if c not in runs or not runs[c].finished)
    probe_entries = read_probe_entries(dirs)
    init_probe = read_init_probe(dirs)
    for row in rows:
        e = init_probe.get((row["model"], row["technique"]))
        row["init_grad_ratio"] = _f(e.get("grad_ratio")) if e else math.nan
        row["init_grad_verdict"] = e.get("verdict") if e else None
    missing = _describe_missing(expected, runs)
    timing = _read_json(out / TIMING_FILE)
    decisions = decide(grid, runs, timing, targets)

    # Derived files first: they are the machine-readable truth the report is drawn from.
    results_jsonl = out / "results.jsonl"
    atomic_write_text(results_jsonl, "".join(json.dumps(r, sort_keys=False) + "\n" for r in records))
    summary_csv = out / "summary.csv"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: _csv_value(row.get(k)) for k in SUMMARY_COLUMNS})
    atomic_write_text(summary_csv, buf.getvalue())
    decisions_json = out / DECISIONS_FILE
    atomic_write_text(decisions_json, json.dumps([decision_record(d) for d in decisions], indent=1) + "\n")

    from reslab import plots  # matplotlib only when drawing

    fig_dir = out / FIGURES_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures: list[Path] = []
    doc = Doc()
    lvl = f"{round(100 * level)}%"
    title = f"reslab comparison: {out.name}"
    doc.h(1, title)
    _decision_section(doc, decisions, grid, probe_entries, timing)
    doc.h(2, "Settings")
    doc.ul(_settings(grid, runs))
    method_words = (
        "Student's t distribution over seeds"
        if method == "t"
        else "paired percentile bootstrap over seeds (10,000 resamples, fixed seed)"
    )
    doc.p(
        f"Intervals are {lvl} confidence intervals from the {method_words}. Differences and speed-ups are paired "
        f"by seed (seed k sees the same data order and augmentation in every technique). Speed-ups are "
        f"geometric means of baseline time / technique time over the seeds where both reached the target. "
        f"p-values are two-sided paired t-tests; 'p (Holm)' adjusts them for comparing several techniques with "
        f"one baseline (Holm-Bonferroni). Target validation accuracy: "
        + ", ".join(f"{m} {stats.fmt_pct(t, 1)}" for m, t in targets.items())
        + "."
    )
    n_done = sum(1 for c in expected if c in runs and runs[c].finished)
    if (grid or {}).get("sequential"):
        doc.p(
            f"Sequential grid: {n_done} runs finished of the {len(cells)} the plan allowed; a technique stops "
            "adding seeds once it is decided, so the rest were not needed."
        )
    cells = expected
    if missing:
        doc.p(f"Incomplete grid: {n_done} of {len(cells)} runs finished. Missing or unfinished:")
        doc.ul(missing)
    else:
        doc.p(f"Complete grid: all {len(cells)} runs finished.")

    models = list(dict.fromkeys(r["model"] for r in rows))
    for model in models:
        target = targets.get(model, math.nan)
        mrows = [r for r in rows if r["model"] == model]
        suffix = f" ({model})" if len(models) > 1 else ""
        doc.h(2, f"Verdict{suffix}")
        if not any(r["technique"] == BASELINE for r in mrows):
            doc.p("No baseline runs found, so no technique is compared against baseline.")
        for r in mrows:
            doc.p(f"{r['technique']}: " + " ".join(verdict(r, level) or ["no finished runs yet."]))

        doc.h(2, f"Summary{suffix}")
        doc.table(
            [
                "technique",
                "runs (ok/div/open)",
                "test acc % (mean ± sd)",
                f"{lvl} CI",
                "IQM %",
                "best val acc %",
                "AUC val acc %",
                "diff vs baseline (pp)",
                f"{lvl} CI (pp)",
                "p",
                "p (Holm)",
            ],
            [
                [
                    r["technique"],
                    f"{r['completed']}/{r['diverged']}/{r['unfinished']}",
                    f"{_fmt(_f(r['test_acc_mean']) * 100)} ± {_fmt(_f(r['test_acc_std']) * 100)}",
                    _fmt_ci(r, "test_acc", 100),
                    _fmt(_f(r["test_acc_iqm"]) * 100) if math.isfinite(_f(r["test_acc_iqm"])) else "n/a (n < 4)",
                    _fmt(_f(r["best_val_acc_mean"]) * 100),
                    _fmt(_f(r["auc_mean"]) * 100),
                    "-" if r["technique"] == BASELINE else _fmt(_f(r["test_acc_diff"]) * 100, "+.2f"),
                    "-" if r["technique"] == BASELINE else _fmt_ci(r, "test_acc_diff", 100, "+.2f"),
                    "-" if r["technique"] == BASELINE else _fmt(r["test_acc_diff_p"], ".3g"),
                    "-" if r["technique"] == BASELINE else _fmt(r.get("test_acc_diff_p_holm"), ".3g"),
                ]
                for r in mrows
            ],
        )
        doc.h(2, f"Convergence{suffix}")
        doc.table(
            [
                "technique",
                f"reached {100 * target:.1f}%",
                "median epochs",
                "median seconds",
                "speed-up (epochs)",
                f"{lvl} CI",
                "speed-up (seconds)",
                f"{lvl} CI",
            ],
            [
                [
                    r["technique"],
                    f"{r['reached']}/{r['reached_of']}",
                    _fmt(r["epochs_to_target_median"], ".0f")
                    if math.isfinite(_f(r["epochs_to_target_median"]))
                    else "not reached",
                    _fmt(r["seconds_to_target_median"], ".1f")
                    if math.isfinite(_f(r["seconds_to_target_median"]))
                    else "not reached",
                    "-" if r["technique"] == BASELINE else _fmt(r["speedup_epochs"]),
                    "-" if r["technique"] == BASELINE else _fmt_ci(r, "speedup_epochs"),
                    "-" if r["technique"] == BASELINE else _fmt(r["speedup_seconds"]),
                    "-" if r["technique"] == BASELINE else _fmt_ci(r, "speedup_seconds"),
                ]
                for r in mrows
            ],
        )
        doc.p(
            "Medians count a seed that never reached the target (or diverged) as slower than every other seed; "
            "'not reached' means fewer than half of the seeds reached it. Seconds are the cumulative time of the "
            "epochs (training and the per-epoch validation) as measured while the grid ran, so they include any "
            "sharing of the CPU between parallel runs."
        )
        model_runs = {c: run for c, run in runs.items() if c.model == model}
        by_tech: dict[str, list[RunData]] = {}
        for c in sorted(model_runs):
            by_tech.setdefault(c.technique, []).append(model_runs[c])
        order = [r["technique"] for r in mrows]
        curves = {t: _curves(by_tech[t]) for t in order if t in by_tech and any(x.metrics for x in by_tech[t])}
        if curves:
            tag = f"-{model}" if len(models) > 1 else ""
            p1 = fig_dir / f"curves-epoch{tag}.png"
            plots.plot_curves(curves, p1, x_axis="epoch", title=f"{model}: against epoch")
            p2 = fig_dir / f"curves-time{tag}.png"
            plots.plot_curves(curves, p2, x_axis="time", title=f"{model}: against training time")
            doc.h(2, f"Curves{suffix}")
            doc.img(p1, f"{FIGURES_DIR}/{p1.name}", f"{model}: validation accuracy and training loss against epoch")
            doc.img(p2, f"{FIGURES_DIR}/{p2.name}", f"{model}: validation accuracy and training loss against time")
            figures += [p1, p2]
            ttt = [
                {
                    "technique": r["technique"],
                    "reached": r["reached"],
                    "n": r["reached_of"],
                    "epochs": (
                        _f(r["epochs_to_target_mean"]),
                        _f(r["epochs_to_target_ci_low"]),
                        _f(r["epochs_to_target_ci_high"]),
                    ),
                    "seconds": (
                        _f(r["seconds_to_target_mean"]),
                        _f(r["seconds_to_target_ci_low"]),
                        _f(r["seconds_to_target_ci_high"]),
                    ),
                }
                for r in mrows
            ]
            p3 = fig_dir / f"time-to-target{tag}.png"
            plots.plot_time_to_target(ttt, p3, target=target, title=f"{model}: time to target")
            doc.img(p3, f"{FIGURES_DIR}/{p3.name}", f"{model}: time to {100 * target:.1f}% validation accuracy")
            figures.append(p3)

        doc.h(2, f"Cost{suffix}")
        doc.table(
            [
                "technique",
                "parameters",
                "vs baseline",
                "FLOPs / image",
                "vs baseline",
                "time per training step (timing pass)",
                "vs baseline [range over rounds]",
            ],
            [
                [
                    r["technique"],
                    f"{int(r['params']):,}" if r["params"] else "n/a",
                    "-" if r["technique"] == BASELINE else _fmt(r["params_ratio"], ".3f") + "x",
                    f"{int(r['flops']):,}" if r["flops"] else "n/a",
                    "-" if r["technique"] == BASELINE else _fmt(r["flops_ratio"], ".3f") + "x",
                    _step_ms(timing, model, r["technique"]),
                    "-" if r["technique"] == BASELINE else _step_ratio_text(timing, model, r["technique"]),
                ]
                for r in mrows
            ],
        )
        doc.p(
            "FLOPs count convolutions and matrix products for one image (a multiply-add is 2). Step times come from "
            "the dedicated timing pass (reslab.timing: every technique's training steps interleaved, nothing else "
            "running, the workers' thread count); the grid's own runs shared the CPU, so their throughput "
            "(summary.csv, images_per_s) is not a cost figure."
        )
        grad_series = {
            t: [gradient_ratios(run.gradients)[:2] for run in by_tech.get(t, []) if run.gradients] for t in order
        }
        grad_series = {t: [s for s in v if s[0]] for t, v in grad_series.items()}
        grad_series = {t: v for t, v in grad_series.items() if v}
        doc.h(2, f"Gradient health{suffix}")
        have_init = any(math.isfinite(_f(r["init_grad_ratio"])) or r["init_grad_verdict"] for r in mrows)
        if have_init or grad_series:
            blocks = next((e["blocks"] for (m, _), e in init_probe.items() if m == model and "blocks" in e), None)
            doc.table(
                [
                    "technique",
                    "at init: max/min block-output gradient" + (f" ({blocks} blocks)" if blocks else ""),
                    "at init: verdict",
                    "during training: worst max/min block parameter-gradient norm",
                ],
                [
                    [
                        r["technique"],
                        _fmt(r["init_grad_ratio"], ".3g"),
                        str(r["init_grad_verdict"] or "n/a"),
                        _fmt(r["worst_grad_ratio"], ".3g"),
                    ]
                    for r in mrows
                ],
            )
            doc.p(
                "At init: reslab.probe on real training batches (train-mode BatchNorm, cross-entropy): the ratio of "
                "the largest to the smallest root-mean-square gradient of a block output across the network, and the "
                "probe's verdict (healthy up to max(L^2, 10) for L blocks). During training: the per-block norm of "
                "the parameter gradients recorded every K steps (--probe-every K), the worst ratio over the run. "
                "A shallow model cannot show an explosion with depth; 'reslab probe --depths 20,56,110,218' does."
            )
        if grad_series:
            tag = f"-{model}" if len(models) > 1 else ""
            p4 = fig_dir / f"gradients{tag}.png"
            plots.plot_gradients(grad_series, p4, model)
            doc.img(p4, f"{FIGURES_DIR}/{p4.name}", f"{model}: gradient-norm spread across blocks during training")
            figures.append(p4)
        if not (have_init or grad_series):
            doc.p(
                "Not measured: no probe-init.json (written by 'reslab compare') and no gradients.jsonl in the runs "
                "(train with --probe-every K to record per-block gradient norms); 'reslab probe' measures gradient "
                "flow at initialisation across depths."
            )
    doc.h(2, "Files")
    doc.p(
        "results.jsonl holds one record per run, summary.csv one row per technique with every figure above "
        "(and more); each run folder under runs/ holds its config.yaml, metrics.jsonl and summary.json. "
        "Regenerate this report with: reslab report " + str(out)
    )
    report_md = out / "report.md"
    atomic_write_text(report_md, doc.markdown())
    report_html = out / "report.html"
    atomic_write_text(report_html, doc.html(title))
    return ReportFiles(results_jsonl, summary_csv, report_md, report_html, figures, missing)


def _targets(
    target_acc: float | str | None, grid: dict[str, Any] | None, runs: dict[Cell, RunData], models: Sequence[str]
) -> dict[str, float]:
    """Per-model validation-accuracy target: the option, the grid's, or 'auto' (see decisions)."""
    raw = target_acc if target_acc is not None else (grid or {}).get("target_acc", 0.9)
    if isinstance(raw, str) and raw.strip().lower() == "auto":
        return {m: auto_target(runs, m) for m in models}
    try:
        target = float(raw)
    except (TypeError, ValueError):
        target = -1.0
    if not 0.0 < target <= 1.0:
        raise UsageError(f"--target-acc must be a fraction in (0, 1], e.g. 0.9, or 'auto', got {raw!r}")
    return dict.fromkeys(models, target)


def _step_ms(timing: dict[str, Any], model: str, technique: str) -> str:
    from reslab.timing import step_seconds

    v = step_seconds(timing, model, technique)
    return "n/a" if v is None else f"{1000 * v:.1f} ms"


def _step_ratio_text(timing: dict[str, Any], model: str, technique: str) -> str:
    from reslab.timing import step_ratio

    r = step_ratio(timing, model, technique)
    return "n/a" if r is None else f"{r[0]:.3f}x [{r[1]:.3f}, {r[2]:.3f}]"


def _git_commit() -> str | None:
    """The commit of the reslab source tree, when it is a git checkout (None otherwise)."""
    import subprocess

    src = Path(__file__).resolve().parent
    try:
        res = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True, text=True)
    return res.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


_LABEL = {"better": "**better**", "worse": "**worse**", "equivalent": "**equivalent**", "undecided": "undecided"}


def _decision_section(
    doc: Doc,
    decisions: Sequence[Decision],
    grid: dict[str, Any] | None,
    probe_entries: Sequence[dict[str, Any]],
    timing: dict[str, Any],
) -> None:
    """The report's first section: what to do, per model and technique, and how sure it is."""
    commit = _git_commit()
    doc.p(
        f"Written by reslab {__version__}"
        + (f" (git {commit})" if commit else "")
        + (f"; grid trained by reslab {grid.get('reslab')}" if grid and grid.get("reslab") else "")
        + "."
    )
    doc.h(2, "Decision")
    if not decisions:
        doc.p("No technique has paired runs with baseline yet, so nothing is decided.")
        return
    d0 = decisions[0]
    doc.table(
        [
            "model",
            "technique",
            "decision",
            "test acc. difference, pp [interval]",
            "seeds",
            "P(beats baseline in a seed)",
            "detectable diff., pp",
            "params / FLOPs",
            "time per step",
            "gradients at init",
            "recommendation",
        ],
        [
            [
                d.model,
                d.technique,
                _LABEL[d.decision] + (f" ({d.why_open})" if d.why_open else ""),
                (f"{pp(d.look.mean)} [{pp(d.look.low)}, {pp(d.look.high)}]" if d.look else "n/a"),
                f"{d.seeds}"
                + (f" of {d.max_seeds}" if d.sequential else "")
                + (f" ({d.diverged} diverged)" if d.diverged else ""),
                (
                    f"{d.p_better.estimate:.2f} [{d.p_better.low:.2f}, {d.p_better.high:.2f}]"
                    if d.p_better and d.p_better.defined
                    else "n/a"
                ),
                pp(d.look.mdd, sign=False) if d.look else "n/a",
                f"{_fmt(d.params_ratio, '.3f')}x / {_fmt(d.flops_ratio, '.3f')}x",
                (f"{d.step[0]:.2f}x [{d.step[1]:.2f}, {d.step[2]:.2f}]" if d.step else "n/a"),
                gradient_verdict(probe_entries, d.technique),
                d.recommendation,
            ]
            for d in decisions
        ],
    )
    plan_words = (
        f"seeds were added one round at a time ({d0.max_seeds} at most) and a technique stopped as soon as it was "
        f"decided; each look's interval is built at a two-sided level of {d0.nominal:.4f} (Pocock-type constant "
        f"level, found by simulating the paired t statistic over the planned looks), so that the intervals of "
        f"all looks hold together with probability {1 - d0.alpha:.0%} (repeated confidence intervals, Jennison & "
        f"Turnbull 1989)"
        if d0.sequential
        else f"every seed was trained (no sequential stopping), so the interval is a plain paired t interval at "
        f"{1 - d0.alpha:.0%}"
    )
    doc.p(
        "How to read this: the difference is technique minus baseline in final test accuracy, paired by seed "
        f"(seed k sees the same data order and augmentation in every technique); {plan_words}. Decisions: "
        f"better / worse when the whole interval lies above / below 0, equivalent when it lies within "
        f"+-{100 * d0.margin:.2g} pp (the margin), otherwise undecided. The chance of any wrong decision per row "
        f"is at most {d0.alpha:g} (for normally distributed differences; checked by simulation in reslab's tests). "
        "A diverged run counts at chance level (a constant prediction of the most frequent test class). "
        "'Detectable diff.' is the smallest true difference these seeds would detect with 80% power at the "
        "observed spread. P(beats baseline in a seed) is the share of paired seeds the technique won, with an "
        "exact Clopper-Pearson 95% interval. Params / FLOPs are ratios to baseline; time per step is the "
        "median ratio to baseline in a dedicated interleaved timing pass (reslab.timing; range over rounds), not "
        "the grid's own runs, which shared the CPU. Gradients at init: reslab.probe's verdict and max/min "
        "block-output gradient ratio at each depth measured (the grid's models and 56 and 110 layers, at the grid's "
        "width)."
    )
    conv = [d for d in decisions if d.convergence]
    if conv:
        doc.h(3, "Convergence")
        doc.table(
            [
                "model",
                "technique",
                "target (val acc)",
                "reached (technique / baseline)",
                "median epochs to target (technique / baseline)",
                "speed-up in epochs [interval]",
                "speed-up in time",
            ],
            [
                [
                    d.model,
                    d.technique,
                    f"{100 * d.convergence['target']:.1f}%" if math.isfinite(d.convergence["target"]) else "n/a",
                    f"{d.convergence['reached']}/{d.convergence['of']} / {d.convergence['base_reached']}/"
                    f"{d.convergence['of']}",
                    f"{_fmt(d.convergence['epochs_median'])} / {_fmt(d.convergence['base_epochs_median'])}",
                    (
                        f"{d.convergence['speedup']:.2f}x [{d.convergence['low']:.2f}, {d.convergence['high']:.2f}]: "
                        f"{d.convergence['label']}"
                        if math.isfinite(d.convergence["speedup"])
                        else d.convergence["label"]
                    ),
                    (
                        f"{d.convergence['speedup'] / d.step[0]:.2f}x"
                        if d.step and math.isfinite(d.convergence["speedup"])
                        else "n/a"
                    ),
                ]
                for d in conv
            ],
        )
        doc.p(
            "Epochs to target are read off the validation evaluations (several per epoch when the grid sets "
            "evals_per_epoch), interpolated linearly between the two around the crossing (from chance level at epoch "
            "0), so they are not multiples of the evaluation interval. The speed-up is baseline's epochs over the "
            "technique's, a geometric mean over the seeds where both reached the target, with an interval at the "
            "same per-look level as the decision; 'speed-up in time' divides it by the step-time ratio."
        )


#: the decision table, machine-readable (one object per model x technique)
DECISIONS_FILE = "decisions.json"


def decision_record(d: Decision) -> dict[str, Any]:
    """One decisions.json object (JSON has no NaN: missing numbers are null)."""
    lk = d.look
    rec = {
        "model": d.model,
        "technique": d.technique,
        "decision": d.decision,
        "open_because": d.why_open or None,
        "seeds": d.seeds,
        "max_seeds": d.max_seeds,
        "sequential": d.sequential,
        "alpha": d.alpha,
        "margin": d.margin,
        "per_look_level": d.nominal,
        "diff_mean": lk.mean if lk else None,
        "diff_low": lk.low if lk else None,
        "diff_high": lk.high if lk else None,
        "detectable_diff": lk.mdd if lk else None,
        "p_better": d.p_better.estimate if d.p_better else None,
        "p_better_low": d.p_better.low if d.p_better else None,
        "p_better_high": d.p_better.high if d.p_better else None,
        "diverged": d.diverged,
        "params_ratio": d.params_ratio,
        "flops_ratio": d.flops_ratio,
        "step_time_ratio": d.step[0] if d.step else None,
        "convergence": d.convergence,
        "recommendation": d.recommendation,
    }
    return _json_safe(rec)


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    return v


def read_probe_entries(dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """Init-probe entries (technique, depth, width, verdict, grad_ratio) of the first folder that
    has them, in reslab.probe's format (results folders of reslab 0.1 have no depth: skipped)."""
    for d in dirs:
        data = _read_json(d / PROBE_FILE)
        res = data.get("results")
        if isinstance(res, list) and res:
            return [e for e in res if isinstance(e, dict) and "technique" in e and "depth" in e]
    return []


def read_init_probe(dirs: Sequence[Path]) -> dict[tuple[str, str], dict[str, Any]]:
    """(model, technique) -> init-probe entry at that model, from the first probe-init.json found
    (reslab.probe's format, or the ``entries`` list of results folders written by reslab 0.1)."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for d in dirs:
        data = _read_json(d / PROBE_FILE)
        if isinstance(data.get("entries"), list):
            items = [e for e in data["entries"] if isinstance(e, dict) and "model" in e and "technique" in e]
        else:
            items = []
            widths = {float((_read_json(d / GRID_FILE).get("train") or {}).get("width", 1.0))}
            for e in data.get("results", []) if isinstance(data.get("results"), list) else []:
                if isinstance(e, dict) and "depth" in e and float(e.get("width", 1.0)) in widths:
                    items.append({**e, "model": f"resnet{int(e['depth'])}", "blocks": e.get("num_blocks")})
        for e in items:
            out.setdefault((str(e["model"]), str(e["technique"])), e)
    return out


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        if math.isinf(v):
            return "inf"
        return f"{v:.6g}"
    return "" if v is None else v
