"""What every figure of reslab shares: the headless backend, one colour per technique, and
the one way a figure is written (atomically, as a compact PNG).

Figures themselves live with what they show: :mod:`reslab.report.figures` (a comparison's
curves, times and gradients) and :mod:`reslab.probe.plots` (gradient flow with depth).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: reports and probes are written on headless machines
import matplotlib.pyplot as plt
from PIL import Image

from reslab.files import atomic_write

DPI = 100
BASELINE = "baseline"


def technique_colors(techniques: Sequence[str]) -> dict[str, str]:
    """Stable colours: baseline black, the others from tab10 in the order given."""
    palette = [matplotlib.colormaps["tab10"](i) for i in range(10)]
    colors: dict[str, str] = {}
    i = 0
    for t in techniques:
        if t == BASELINE:
            colors[t] = "black"
        else:
            colors[t] = matplotlib.colors.to_hex(palette[i % 10])
            i += 1
    return colors


def save_figure(fig: plt.Figure, path: Path, tight: bool = True, quantize: bool = False) -> None:
    """Write ``fig`` to ``path`` as PNG (atomically) and close it.

    ``quantize`` stores a 256-colour palette: lossless for line plots and a third of the
    size, which matters for figures committed to repositories and embedded in reports.
    """
    if tight:
        fig.tight_layout()
    if not quantize:
        atomic_write(path, lambda p: fig.savefig(p, dpi=DPI, format="png"))
        plt.close(fig)
        return
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png")
    plt.close(fig)
    buf.seek(0)
    image = Image.open(buf).convert("RGB").quantize(256)
    atomic_write(path, lambda p: image.save(p, format="PNG", optimize=True))
