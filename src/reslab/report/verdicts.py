"""The verdict sentences of a report: what a summary row (:mod:`reslab.report.aggregate`) lets one
claim, in plain words, each claim next to the interval that backs it."""

from __future__ import annotations

import math
from typing import Any

from reslab.report.aggregate import as_float
from reslab.study import stats
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
            p_holm = as_float(row.get("test_acc_diff_p_holm"))
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
    if math.isfinite(as_float(row["params_ratio"])):
        cost.append(f"{100 * (row['params_ratio'] - 1):+.1f}% parameters")
    if math.isfinite(as_float(row["flops_ratio"])):
        cost.append(f"{100 * (row['flops_ratio'] - 1):+.1f}% FLOPs")
    if cost:  # time per step: the decision table and Cost section, from the dedicated timing pass
        out.append("Cost: " + ", ".join(cost) + ".")
    out += _gradient_words(row)
    return out


def _gradient_words(row: dict[str, Any]) -> list[str]:
    r, v = as_float(row.get("init_grad_ratio")), row.get("init_grad_verdict")
    if not v:
        return []
    ratio = f"max/min block-output gradient ratio {r:.3g}" if math.isfinite(r) else "gradient ratio undefined"
    return [
        f"Gradient flow at initialisation, at this model's depth ({row['model']}): {v} ({ratio}); "
        "other depths are in the decision table."
    ]


def _iv(row: dict[str, Any], key: str) -> stats.Interval:
    est = as_float(row.get(key, row.get(f"{key}_mean")))
    return stats.Interval(
        est, as_float(row[f"{key}_ci_low"]), as_float(row[f"{key}_ci_high"]), method=row["interval_method"]
    )
