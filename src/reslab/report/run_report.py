"""Figures for one run folder (``reslab report RUN``): its training curves and, when the
run recorded them (``reslab train --probe-every K``), its per-block gradient norms.

Reads ``metrics.jsonl``, ``summary.json`` and ``gradients.jsonl``; never trains. Writes
``RUN/report/curves.png``, ``RUN/report/gradients.png`` (when recorded) and
``RUN/report/report.md``, which embeds them with the run's summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reslab.engine.runs import SUMMARY_FILE, read_jsonl, read_summary, summary_problem
from reslab.errors import UsageError
from reslab.files import atomic_write, atomic_write_text
from reslab.report.aggregate import gradient_ratios

__all__ = ["RunReport", "is_run_folder", "write_run_report"]

#: keys of a gradients.jsonl record that are not per-block norms
_GRAD_META = frozenset({"step", "epoch"})


@dataclass
class RunReport:
    folder: Path
    files: list[Path] = field(default_factory=list)


def is_run_folder(path: str | Path) -> bool:
    """A folder written by ``reslab train`` (not a results folder of ``reslab compare``)."""
    p = Path(path)
    return p.is_dir() and (p / "summary.json").is_file() and not (p / "grid.json").exists()


def _plot_curves(metrics: list[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in metrics]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("train", "-"), ("val", "--")):
        ax_loss.plot(epochs, [r.get(f"{key}_loss", math.nan) for r in metrics], style, marker="o", label=key)
        ax_acc.plot(epochs, [r.get(f"{key}_acc", math.nan) for r in metrics], style, marker="o", label=key)
    ax_loss.set(xlabel="epoch", ylabel="loss (train: label-smoothed)", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)


def _plot_gradients(records: list[dict[str, Any]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = [k for k in records[0] if k not in _GRAD_META]
    steps = [r.get("step", i) for i, r in enumerate(records)]
    fig, (ax_norm, ax_ratio) = plt.subplots(1, 2, figsize=(10, 4))
    cmap = matplotlib.colormaps["viridis"]
    for i, b in enumerate(blocks):
        color = cmap(i / max(len(blocks) - 1, 1))
        ax_norm.plot(
            steps,
            [r.get(b, math.nan) for r in records],
            color=color,
            lw=1,
            label=b if i in (0, len(blocks) - 1) else None,
        )
    ax_ratio.plot(*gradient_ratios(records), color="black")
    ax_norm.set(
        xlabel="optimizer step", ylabel="gradient L2 norm per block", yscale="log", title="per block (first to last)"
    )
    ax_ratio.set(
        xlabel="optimizer step", ylabel="largest / smallest block norm", yscale="log", title="spread across blocks"
    )
    ax_norm.legend(fontsize="small")
    for ax in (ax_norm, ax_ratio):
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)


def write_run_report(run: str | Path, out: str | Path | None = None) -> RunReport:
    """Write the figures of run folder ``run`` into ``out`` (default ``run/report``)."""
    run = Path(run)
    summary = read_summary(run)
    if summary is None:
        why = summary_problem(run / SUMMARY_FILE) or "is missing"
        raise UsageError(f"{run}/{SUMMARY_FILE} {why}; is {run} a run folder of 'reslab train'?")
    metrics = [r for r in read_jsonl(run / "metrics.jsonl") if "epoch" in r]
    if not metrics:
        raise UsageError(f"{run} has no completed epoch in metrics.jsonl yet; report it after the first epoch")
    folder = Path(out) if out is not None else run / "report"
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file; remove it or move it away, then report again")
    report = RunReport(folder)
    get = summary.get
    title = f"{get('model', '?')} ({get('technique', '?')}), {get('dataset', '?')}, seed {get('seed', '?')}"
    _plot_curves(metrics, title, folder / "curves.png")
    report.files.append(folder / "curves.png")
    grads = [r for r in read_jsonl(run / "gradients.jsonl") if len(r) > len(_GRAD_META)]
    if grads:
        _plot_gradients(grads, title, folder / "gradients.png")
        report.files.append(folder / "gradients.png")
    last = metrics[-1]
    lines = [
        f"# {title}",
        "",
        f"Status **{summary.get('status', '?')}**, {summary.get('epochs_completed', len(metrics))} of "
        f"{summary.get('epochs', '?')} epochs; best validation accuracy {summary.get('best_val_acc')} "
        f"(epoch {summary.get('best_epoch')}); test accuracy {summary.get('test_acc')}.",
        f"Last epoch: train loss {last.get('train_loss', math.nan):.4f}, "
        f"val loss {last.get('val_loss', math.nan):.4f}, val accuracy {last.get('val_acc', math.nan):.4f}.",
        "",
        "![training curves](curves.png)",
    ]
    if grads:
        lines += [
            "",
            f"Gradient norms recorded every {grads[1]['step'] - grads[0]['step'] if len(grads) > 1 else '?'} steps:",
            "",
            "![gradient norms](gradients.png)",
        ]
    atomic_write_text(folder / "report.md", "\n".join(lines) + "\n")
    report.files.append(folder / "report.md")
    return report
