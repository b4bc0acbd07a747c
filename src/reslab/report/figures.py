"""Figures for ``reslab report`` (matplotlib, Agg backend: no display needed).

Every figure is sized and labelled for a browser and a printed page: axis labels with
units, a legend, a title that says what the band or whisker means.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from reslab.plotting import BASELINE, save_figure, technique_colors


def _band(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min, max over seeds per epoch, and the count of seeds with a value there."""
    count = np.sum(np.isfinite(matrix), axis=0)
    with np.errstate(all="ignore"):
        safe = np.where(np.isfinite(matrix), matrix, np.nan)
        mean = np.nanmean(safe, axis=0) if matrix.size else np.array([])
        lo = np.nanmin(safe, axis=0) if matrix.size else np.array([])
        hi = np.nanmax(safe, axis=0) if matrix.size else np.array([])
    return mean, lo, hi, count


def plot_curves(
    curves: Mapping[str, Mapping[str, np.ndarray]],
    path: Path,
    *,
    x_axis: str,
    title: str,
) -> None:
    """Validation accuracy and training loss, one line per technique, band = range over seeds.

    ``curves[technique]`` holds seeds x epochs matrices under ``val_acc``, ``train_loss`` and
    ``elapsed_s`` (nan where a seed has no value, e.g. after it diverged). ``x_axis`` is
    ``"epoch"`` or ``"time"`` (mean cumulative training seconds at each epoch over seeds).
    """
    colors = technique_colors(list(curves))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for tech, c in curves.items():
        n_seeds = c["val_acc"].shape[0]
        if x_axis == "epoch":
            x = np.arange(1, c["val_acc"].shape[1] + 1, dtype=float)
        else:
            x, _, _, _ = _band(c["elapsed_s"])
        style = "--" if tech == BASELINE else "-"
        for ax, key, scale in ((axes[0], "val_acc", 100.0), (axes[1], "train_loss", 1.0)):
            mean, lo, hi, count = _band(c[key])
            ok = (count > 0) & np.isfinite(x)
            if not ok.any():
                continue
            label = f"{tech} (n={n_seeds})"
            ax.plot(x[ok], mean[ok] * scale, style, color=colors[tech], label=label, lw=1.8, marker=".", ms=5)
            if n_seeds > 1:
                ax.fill_between(x[ok], lo[ok] * scale, hi[ok] * scale, color=colors[tech], alpha=0.15, lw=0)
    xlabel = "epoch" if x_axis == "epoch" else "training time (s, mean over seeds)"
    axes[0].set_xlabel(xlabel)
    axes[0].set_ylabel("validation accuracy (%)")
    axes[0].set_title("Validation accuracy")
    axes[1].set_xlabel(xlabel)
    axes[1].set_ylabel("training loss (cross-entropy)")
    axes[1].set_title("Training loss")
    finite_losses = [v for c in curves.values() for v in c["train_loss"].ravel() if math.isfinite(v) and v > 0]
    if finite_losses and max(finite_losses) / min(finite_losses) > 20:
        axes[1].set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
        if x_axis == "epoch":
            ax.xaxis.get_major_locator().set_params(integer=True)
    handles, _ = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{title}  (line: mean over seeds; band: min-max over seeds)", fontsize=10)
    save_figure(fig, path)


def plot_time_to_target(
    rows: Sequence[Mapping[str, object]],
    path: Path,
    *,
    target: float,
    title: str,
) -> None:
    """Bars: mean epochs / seconds to the target over the seeds that reached it; whiskers: 95% t interval.

    Each row has ``technique``, ``reached``, ``n``, ``epochs`` and ``seconds`` (each a
    ``(mean, low, high)`` triple, nan when no seed reached the target).
    """
    techs = [str(r["technique"]) for r in rows]
    colors = technique_colors(techs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 1.6 + 0.55 * max(len(rows), 2)))
    for ax, key, unit in ((axes[0], "epochs", "epochs"), (axes[1], "seconds", "seconds of training")):
        top = 0.0
        labels: list[tuple[int, float, str]] = []
        for i, r in enumerate(rows):
            mean, low, high = r[key]  # type: ignore[misc]
            note = f"{r['reached']}/{r['n']} reached"
            if not math.isfinite(mean):
                labels.append((i, 0.0, f"not reached ({note})"))
                continue
            ax.barh(i, mean, color=colors[str(r["technique"])], alpha=0.8, height=0.6)
            right = mean
            if math.isfinite(low) and math.isfinite(high):
                ax.errorbar(mean, i, xerr=[[mean - max(low, 0.0)], [high - mean]], fmt="none", ecolor="0.2", capsize=4)
                right = high
            top = max(top, right)
            labels.append((i, right, f"{mean:.1f}  ({note})"))
        xmax = top * 1.45 if top > 0 else 1.0
        for i, x, text in labels:
            ax.text(x + 0.01 * xmax, i, " " + text, va="center", fontsize=8, color="0.25")
        ax.set_yticks(np.arange(len(rows)), techs)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.set_xlabel(f"time to {100 * target:.1f}% validation accuracy ({unit})")
        ax.set_xlim(0, xmax)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{title}  (bar: mean over seeds that reached it; whisker: 95% t interval)", fontsize=10)
    save_figure(fig, path)


def plot_gradients(
    series: Mapping[str, Sequence[tuple[Sequence[float], Sequence[float]]]], path: Path, title: str
) -> None:
    """Largest / smallest per-block gradient norm during training, one line per technique.

    ``series[technique]`` is a list (one per seed) of ``(steps, ratios)``. The line is the
    geometric mean over seeds at each step (ratios multiply, so they average on a log
    scale), the band the range over seeds. The y axis is logarithmic when the ratios span
    more than a factor of 10, where an explosion with depth would show.
    """
    colors = technique_colors(list(series))
    fig, ax = plt.subplots(figsize=(9, 4.2))
    all_vals: list[float] = []
    for tech, seeds in series.items():
        by_step: dict[float, list[float]] = {}
        for steps, ratios in seeds:
            for st, r in zip(steps, ratios, strict=True):
                if math.isfinite(r) and r > 0:
                    by_step.setdefault(float(st), []).append(float(r))
        if not by_step:
            continue
        xs = np.array(sorted(by_step))
        logs = [np.log(by_step[x]) for x in xs]
        mean = np.exp([v.mean() for v in logs])
        lo = np.exp([v.min() for v in logs])
        hi = np.exp([v.max() for v in logs])
        all_vals += list(lo) + list(hi)
        style = "--" if tech == BASELINE else "-"
        ax.plot(xs, mean, style, color=colors[tech], lw=1.6, label=f"{tech} (n={len(seeds)})")
        if len(seeds) > 1:
            ax.fill_between(xs, lo, hi, color=colors[tech], alpha=0.12, lw=0)
    if all_vals and max(all_vals) / max(min(all_vals), 1e-300) > 10:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("max / min gradient norm across blocks")
    ax.set_title(
        f"{title}: spread of per-block parameter-gradient norms during training\n"
        "(line: geometric mean over seeds; band: min-max over seeds; 1 = equal norms in every block)",
        fontsize=10,
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)


#: colour of each verdict in the decision plot
VERDICT_COLORS = {"better": "#1a9850", "worse": "#d73027", "equivalent": "#2166ac", "undecided": "0.45"}


def plot_decisions(rows: Sequence[Mapping[str, object]], path: Path, *, margin: float, title: str) -> None:
    """The decision plot: one line per comparison, grouped by model, top to bottom in table order.

    Each row has ``model``, ``technique``, ``verdict`` (better, worse, equivalent, undecided),
    ``label`` (the words printed at its right), ``estimate``, ``low`` and ``high`` (the decision's
    difference and interval, accuracy fractions; nan when there is none). Drawn in pp: the
    point estimate, the interval as a bar, the zero line and the equivalence band (+-margin)
    shaded. An interval past the axis is cut at the edge with an arrow, so a row that says
    nothing yet cannot squeeze the others into a dot.
    """
    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    # y positions: a header line per model (only when several), then its rows
    ys: list[float] = []
    headers: list[tuple[float, str]] = []
    y = 0.0
    for m in models:
        if len(models) > 1:
            headers.append((y, m))
            y += 0.8
        for r in rows:
            if r["model"] == m:
                ys.append(y)
                y += 1.0
        y += 0.3
    order = [r for m in models for r in rows if r["model"] == m]
    bounds = [abs(100 * float(v)) for r in order for v in (r["low"], r["high"]) if math.isfinite(float(v))]  # type: ignore[arg-type]
    points = [abs(100 * float(r["estimate"])) for r in order if math.isfinite(float(r["estimate"]))]  # type: ignore[arg-type]
    # wide enough for every estimate and the band, and for the intervals up to 25 pp
    lim = max([3 * 100 * margin, *points, *(b for b in bounds if b <= 25.0)]) * 1.08
    fig, ax = plt.subplots(figsize=(11, 0.9 + 0.3 * (y + 0.2)))
    ax.axvspan(-100 * margin, 100 * margin, color="#2166ac", alpha=0.12, lw=0)
    ax.axvline(0.0, color="0.2", lw=0.9)
    for yy, r in zip(ys, order, strict=True):
        color = VERDICT_COLORS.get(str(r["verdict"]), "0.45")
        est, low, high = (100 * float(r[k]) for k in ("estimate", "low", "high"))  # type: ignore[arg-type]
        if math.isfinite(low) and math.isfinite(high):
            lo, hi = max(low, -lim), min(high, lim)
            ax.plot([lo, hi], [yy, yy], color=color, lw=2.4, solid_capstyle="butt")
            for edge, cut, marker in ((lo, low < -lim, "<"), (hi, high > lim, ">")):
                ax.plot([edge], [yy], marker=marker if cut else "|", color=color, ms=8 if cut else 10, mew=2)
        if math.isfinite(est):
            ax.plot([min(max(est, -lim), lim)], [yy], "o", color=color, ms=6, mec="white", mew=0.8)
        ax.text(1.01, yy, str(r["label"]), transform=ax.get_yaxis_transform(), va="center", fontsize=9, color=color)
    for yy, m in headers:
        ax.text(0.0, yy, m, transform=ax.get_yaxis_transform(), va="center", fontsize=9.5, fontweight="bold")
    ax.set_yticks(ys, [f"{r['technique']}" + ("  " if headers else "") for r in order], fontsize=9)
    ax.set_ylim(y - 0.1, -0.9)
    ax.set_xlim(-lim, lim)
    ax.set_xlabel(
        "test accuracy, technique minus baseline (pp): point = mean over paired seeds, bar = decision interval"
    )
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"{title}  (shaded: equivalence band +-{100 * margin:.2g} pp)", fontsize=10, loc="left")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    fig.subplots_adjust(right=0.78)
    save_figure(fig, path, tight=False, quantize=True)
