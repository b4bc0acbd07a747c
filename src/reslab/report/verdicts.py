"""The verdict sentences of a report: what a summary row (:mod:`reslab.report.aggregate`) lets one
claim, in plain words, each claim next to the interval that backs it."""

from __future__ import annotations

import math
from typing import Any

from reslab.report.aggregate import as_float
from reslab.study import stats
from reslab.study.decisions import Decision, interval_ratio
from reslab.study.regime import Regime
from reslab.study.results import BASELINE


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


def fmt_acc_interval(low: float, high: float, digits: int = 2, unit: str = "") -> str:
    """An interval of an accuracy (fractions, printed in %), never with impossible bounds: one
    spanning the whole 0-100% range or more says that it says nothing; one with a single bound
    past 0% or 100% is clipped there, with a note."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return "n/a"
    if high - low >= 1.0:
        return "too few seeds for an interval (it would be wider than 0-100%)"
    lo, hi = max(low, 0.0), min(high, 1.0)
    text = f"[{100 * lo:.{digits}f}, {100 * hi:.{digits}f}]{unit}"
    if lo != low or hi != high:
        text += f" (clipped at {'0%' if lo != low else '100%'}: too few seeds for a tighter interval)"
    return text


def _pp(x: float) -> str:
    return f"{100 * x:+.2f} pp"


def _ratio_words(x: float) -> str:
    return f"{x:.2f}x"


def verdict(
    row: dict[str, Any], level: float = 0.95, decision: Decision | None = None, regime: Regime | None = None
) -> list[str]:
    """Plain-words findings for one technique. Its accuracy and convergence are the decision's
    (:mod:`reslab.study.decisions`), in the same numbers as the decision table: this section adds
    detail, never a second verdict. Without a decision, no claim is made."""
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
            ci = fmt_acc_interval(*_bounds(row, "test_acc"), unit="%")
            when = f"after {regime.length} ({regime.label})" if regime is not None else "at the end of training"
            out.append(
                f"Reference: test accuracy {when} {stats.fmt_pct(row['test_acc_mean'])} "
                f"({ci if not ci.startswith('[') else f'{lvl} CI {ci}'}, {row['completed']} seeds)."
            )
        return out + _gradient_words(row)
    if decision is None:
        out.append("Accuracy: no decision was taken for this technique, so no claim about accuracy is made.")
    else:
        words = f"Accuracy (the decision table's): {decision.decision}"
        words += f" ({decision.why_open})" if decision.why_open else ""
        words += f" - {decision.reason}"
        if decision.trained > decision.seeds:
            words += f"; {decision.trained} seeds were trained in all"
        out.append(words + ".")
        out.append(_convergence_words(decision))
    cost = []
    if math.isfinite(as_float(row["params_ratio"])):
        cost.append(f"{100 * (row['params_ratio'] - 1):+.1f}% parameters")
    if math.isfinite(as_float(row["flops_ratio"])):
        cost.append(f"{100 * (row['flops_ratio'] - 1):+.1f}% FLOPs")
    if cost:  # time per step: the decision table and Cost section, from the dedicated timing pass
        out.append("Cost: " + ", ".join(cost) + ".")
    out += _gradient_words(row)
    return out


def _convergence_words(d: Decision) -> str:
    """The decision's convergence figure (the decision table's Convergence rows), in words."""
    c = d.convergence
    if not c:
        return "Convergence: not measured."
    target = f"{100 * c['target']:.1f}%" if math.isfinite(c["target"]) else "the target"
    reach = f"reached {target} in {c['reached']} of {c['of']} seeds"
    if c["reached"] == 0:
        return f"Convergence: no seed reached {target} validation accuracy, so no speed-up can be measured."
    if not math.isfinite(c["speedup"]):
        return f"Convergence: {reach}; {c['label']}, so no speed-up is claimed."
    iv = interval_ratio(c["low"], c["high"])
    return (
        f"Convergence: {reach}; baseline's epochs to target over the technique's {_ratio_words(c['speedup'])} "
        f"{iv} over {c['pairs']} paired seeds: {c['label']} (interval at the decision's per-look level)."
    )


def _gradient_words(row: dict[str, Any]) -> list[str]:
    r, v = as_float(row.get("init_grad_ratio")), row.get("init_grad_verdict")
    if not v:
        return []
    ratio = f"max/min block-output gradient ratio {r:.3g}" if math.isfinite(r) else "gradient ratio undefined"
    return [
        f"Gradient flow at initialisation, at this model's depth ({row['model']}): {v} ({ratio}); "
        "other depths are in the decision table."
    ]


def _bounds(row: dict[str, Any], key: str) -> tuple[float, float]:
    return as_float(row[f"{key}_ci_low"]), as_float(row[f"{key}_ci_high"])
