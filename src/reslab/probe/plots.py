"""Figures of ``reslab probe`` (matplotlib, Agg backend): signal propagation per depth and
the output-gradient ratio against depth."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from reslab.plotting import save_figure, technique_colors
from reslab.probe.measure import ProbeEntry, ratio_threshold
from reslab.probe.records import iter_cells

_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h", "<", ">")


def _style(techniques: Sequence[str]) -> dict[str, dict[str, object]]:
    """Colour, dash and marker per technique: identical curves (``scale`` is ``baseline``
    at init, ``zero_init`` is ``skipinit``) stay visible as dashes over a solid line."""
    colors = technique_colors(techniques)
    return {
        t: {"color": colors[t], "ls": _STYLES[i % len(_STYLES)], "marker": _MARKERS[i % len(_MARKERS)]}
        for i, t in enumerate(techniques)
    }


def _positive(values: Sequence[float]) -> list[float]:
    # Log axes cannot show 0 or non-finite values; leave a gap instead of a fake point.
    return [v if (math.isfinite(v) and v > 0) else math.nan for v in values]


def plot_signal_propagation(entries: Sequence[ProbeEntry], path: str | Path, when: str = "at init") -> Path:
    """One column per depth; rows: output variance, squared channel mean, output-gradient RMS.

    The first two rows are the signal propagation plot of Brock, De & Smith (2021),
    block index on x, averaged over channels; the third shows the backward signal on
    the same axis, so an exploding merge is visible as a line falling to the right.
    """
    path = Path(path)
    groups = list(iter_cells(entries))
    techniques = list(dict.fromkeys(e.technique for e in entries))
    styles = _style(techniques)
    rows = (
        ("out_var", "avg channel variance\nof block output"),
        ("out_mean_sq", "avg squared channel mean\nof block output"),
        ("grad_rms", "RMS of d loss / d output"),
    )
    ncol = len(groups)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(4.2 * ncol + 0.8, 10.0), squeeze=False, sharex="col")
    for c, (depth, cells) in enumerate(groups):
        for r, (key, label) in enumerate(rows):
            ax = axes[r][c]
            for e in cells:
                xs = [b.index + 1 for b in e.probe.blocks]
                ys = _positive([getattr(b, key) for b in e.probe.blocks])
                st = dict(styles[e.technique])
                if len(xs) > 30:  # markers would hide the line at depth
                    st["marker"] = None
                ax.plot(xs, ys, label=e.technique, lw=1.4, ms=4, **st)  # type: ignore[arg-type]
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if r == 0:
                ax.set_title(f"ResNet-{depth} ({len(cells[0].probe.blocks)} blocks)")
            if r == len(rows) - 1:
                ax.set_xlabel("residual block (input -> output)")
            if c == 0:
                ax.set_ylabel(label)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), frameon=False)
    fig.suptitle(f"Signal propagation {when} (train-mode BN, real batches, mean over batches)")
    fig.tight_layout(rect=(0, 0.07 if len(labels) > 5 else 0.04, 1, 1))
    save_figure(fig, path, tight=False, quantize=True)
    return path


def plot_gradient_ratio(entries: Sequence[ProbeEntry], path: str | Path, when: str = "at init") -> Path:
    """Max/min output-gradient RMS across blocks against depth (log y), with the threshold."""
    path = Path(path)
    techniques = list(dict.fromkeys(e.technique for e in entries))
    styles = _style(techniques)
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    depths = sorted({e.depth for e in entries})
    blocks = {e.depth: e.probe.num_blocks for e in entries}
    undefined = []
    for t in techniques:
        cells = sorted((e for e in entries if e.technique == t), key=lambda e: e.depth)
        xs = [e.depth for e in cells]
        ys = _positive([e.probe.grad_ratio for e in cells])
        if all(math.isnan(y) for y in ys):
            undefined.append(t)
            continue
        ax.plot(xs, ys, lw=1.6, label=t, **styles[t])  # type: ignore[arg-type]
    # The verdict's threshold L^2 (L = residual blocks; (depth - 2) / 2 for CIFAR-style nets).
    ax.plot(
        depths,
        [ratio_threshold(blocks[d]) for d in depths],
        color="grey",
        ls="--",
        lw=1.2,
        label="threshold L² (above: exploding/vanishing)",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(depths)
    ax.set_xticklabels([str(d) for d in depths])
    ax.minorticks_off()
    ax.set_xlabel("depth (layers)")
    ax.set_ylabel("max / min RMS of d loss / d block output")
    title = f"Gradient ratio across blocks {when}"
    if undefined:
        title += f"\n(not shown, all block gradients zero: {', '.join(undefined)})"
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="upper left")
    save_figure(fig, path, quantize=True)
    return path


__all__ = ["plot_gradient_ratio", "plot_signal_propagation"]
