"""Measure gradient flow and signal propagation at initialisation for techniques x depths.

For every technique and CIFAR-style depth (any 6n+2), builds the model with default init,
runs a few real training batches in train mode (BatchNorm batch statistics, cross-entropy)
and records per residual block the output's channel-averaged mean and variance, the RMS of
the gradient with respect to the block output and the block's parameter-gradient norm.
The headline is the ratio of the largest to the smallest output-gradient RMS across
blocks; the verdict calls a network exploding or vanishing when that ratio exceeds L^2
(L = number of residual blocks; see reslab.probe.measure.ratio_threshold for why). Writes
probe.json, probe.md, signal_propagation.png and gradient_ratio.png to --out.

With --weights, probes one saved model (e.g. RUN/model.safetensors from reslab train)
instead, on batches of the dataset it was trained on: gradient flow after training."""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reslab.errors import UsageError

if TYPE_CHECKING:
    from reslab.probe.measure import ProbeEntry

# torch and reslab.probe are imported where they are used: 'reslab --help' must not load torch

NAME = "probe"
HELP = "gradient flow and signal propagation at init, techniques x depths"
ORDER = 30

DEFAULT_DEPTHS = "20,56,110,218"
OUTPUT_FILES = ("probe.json", "probe.md", "signal_propagation.png", "gradient_ratio.png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--techniques", "-t", default=None, help="comma-separated technique names, or 'all' (default)")
    parser.add_argument("--depths", "-d", default=None, help="comma-separated depths 6n+2 (default: 20,56,110,218)")
    parser.add_argument(
        "--dataset",
        default=None,
        help="in-memory dataset (default: fashion-mnist, or that of --weights)",
    )
    parser.add_argument("--data-dir", default=None, help="folder with the dataset files (searched first)")
    parser.add_argument("--batches", type=int, default=4, help="number of batches to average over (default: 4)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="images per batch (default: 64, which keeps 4 depths x every technique under 2 minutes on a "
        "2-core CPU; 128 moves healthy ratios by about 1%%)",
    )
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier of the 16/32/64 stages")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init and the batch draw (default: 0)")
    parser.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default="float32",
        help="model precision (default float32; float64 when float32 gradients overflow)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where to probe: cpu (default), cuda, cuda:N or auto (CUDA when present)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="parallel processes, one thread each (default: one per available core, at most 4)",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="probe trained weights (a .safetensors written by reslab, or a run folder) instead of fresh models",
    )
    parser.add_argument("--out", "-o", default=None, help="output folder (default: probe/<dataset>-<time>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the probe files of an existing --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or per-cell lines")


def _check(args: argparse.Namespace) -> tuple[list[str], list[int], Path]:
    from reslab.nn.techniques import parse_techniques
    from reslab.probe.runner import resolve_depths

    if args.weights is not None:
        given = [f"--{n}" for n in ("techniques", "depths", "width") if getattr(args, n) not in (None, 1.0)]
        if given:
            raise UsageError(f"--weights probes the saved model as it is; drop {', '.join(given)}")
        techniques, depths = [], []
    else:
        try:
            techniques = parse_techniques(args.techniques or "all")
            depths = resolve_depths(args.depths or DEFAULT_DEPTHS)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.batches < 1:
        raise UsageError(f"--batches must be at least 1, got {args.batches}")
    if args.batch_size < 2:
        raise UsageError(f"--batch-size must be at least 2 (BatchNorm needs batch statistics), got {args.batch_size}")
    if not args.width > 0:
        raise UsageError(f"--width must be positive, got {args.width}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    from reslab.engine.devices import pick_device

    try:
        args.device = pick_device(args.device)  # a UsageError when CUDA is asked for and absent
    except RuntimeError as e:  # a device string torch does not know
        raise UsageError(f"--device {args.device}: {e}; use cpu, cuda, cuda:N or auto") from None
    if args.dataset is not None and args.dataset.startswith("folder:"):
        raise UsageError("reslab probe needs an in-memory dataset (fashion-mnist, cifar10, cifar100, digits)")
    if args.out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("probe") / f"{args.dataset or 'fashion-mnist'}-{stamp}"
    else:
        out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    from reslab.paths import check_writable_dir

    check_writable_dir(out)  # before the work, not after it
    return techniques, depths, out


class _CellProgress:
    """Finished probe cells: a bar weighted by cell cost (so its ETA is honest) on a
    terminal, else a line per cell."""

    def __init__(self, total: float, cells: int, enabled: bool) -> None:
        from reslab.progress import Progress

        self.cells = cells
        self.done = 0
        self.prog = Progress("probe", enabled=enabled, unit="blk", smoothing=0.0)
        self.prog.start(round(total))

    def __call__(self, entry: ProbeEntry, cost: float) -> None:
        from reslab.probe.measure import fmt

        self.done += 1
        if self.prog.showing_bar:
            self.prog.advance(round(cost), f"{entry.technique} resnet{entry.depth}")
        else:
            self.prog.line(
                f"[{self.done}/{self.cells}] {entry.technique:<10} resnet{entry.depth:<4} "
                f"ratio {fmt(entry.probe.grad_ratio):>8}  {entry.verdict.label:<9} {entry.seconds:.1f}s"
            )

    def close(self) -> None:
        self.prog.close()


def _command_line(args: argparse.Namespace, techniques: list[str], depths: list[int], dataset: str) -> str:
    """The command that reproduces these numbers (every setting that changes them)."""
    if args.weights is not None:
        grid = [f"--weights {args.weights}"]
    else:
        grid = [f"--techniques {','.join(techniques)}", f"--depths {','.join(map(str, depths))}"]
    parts = [
        "reslab probe",
        *grid,
        f"--dataset {dataset}",
        f"--batches {args.batches}",
        f"--batch-size {args.batch_size}",
        f"--seed {args.seed}",
    ]
    if args.width != 1.0:
        parts.append(f"--width {args.width:g}")
    if args.dtype != "float32":
        parts.append(f"--dtype {args.dtype}")
    if str(getattr(args, "device", "cpu")) != "cpu":
        parts.append(f"--device {args.device}")
    return " ".join(parts)


def _weights_path(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise UsageError(f"--weights {text}: no such file (give a model.safetensors or a run folder that has one)")
    return path


def _probe_weights(
    args: argparse.Namespace, path: Path
) -> tuple[list[ProbeEntry], list[str], list[int], str, dict[str, Any]]:
    """Probe one saved model on batches of the dataset it was trained on."""
    import torch

    from reslab.engine.data import load_arrays
    from reslab.nn.weights import load_model, read_metadata
    from reslab.probe.measure import ProbeEntry, probe_model, verdict
    from reslab.probe.runner import make_batches, prepare

    meta = read_metadata(path)
    model = load_model(path)
    spec = model.spec
    dataset = args.dataset or meta.get("dataset") or "fashion-mnist"
    if dataset.startswith("folder:"):
        raise UsageError(f"{path} was trained on {dataset}; pass an in-memory --dataset to probe it")
    ds = load_arrays(dataset, args.data_dir)
    size = list(ds.input_size)
    if meta.get("input_size") not in (None, size) or spec.in_channels != size[0] or spec.num_classes != ds.num_classes:
        raise UsageError(
            f"{path} expects {meta.get('input_size', spec.in_channels)} inputs and {spec.num_classes} classes; "
            f"{dataset} has {size} and {ds.num_classes}: pass the --dataset it was trained on"
        )
    # Normalize as the model saw its data in training.
    mean, std = meta.get("mean", ds.mean), meta.get("std", ds.std)
    try:
        batches = make_batches(ds.train_x, ds.train_y, mean, std, args.batches, args.batch_size, args.seed)
    except ValueError as e:
        raise UsageError(f"{e}; use fewer --batches or a smaller --batch-size") from None
    m = re.fullmatch(r"resnet(\d+)", spec.name)
    depth = int(m.group(1)) if m else 0
    dtype = getattr(torch, args.dtype)
    model, data = prepare(model, batches, dtype, args.device)
    torch.manual_seed(args.seed)  # DropPath, if the model has it, draws from here
    t0 = time.perf_counter()
    probe = probe_model(model, data)
    entry = ProbeEntry(spec.technique, depth, probe, verdict(probe), time.perf_counter() - t0)
    extra = {"weights": str(path), "model": spec.name, "width": spec.options.get("width", 1.0)}
    return [entry], [spec.technique], [depth], dataset, extra


def run(args: argparse.Namespace) -> int:
    import torch

    from reslab.engine.devices import describe_device
    from reslab.files import atomic_write_text
    from reslab.probe.records import entry_to_dict, write_probe_file
    from reslab.probe.runner import default_workers
    from reslab.probe.summary import ratio_cell, render_markdown, table

    techniques, depths, out = _check(args)
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if args.weights is not None:
        workers = 1
        entries, techniques, depths, dataset, extra = _probe_weights(args, _weights_path(args.weights))
    else:
        # on a GPU the cells run one after another in this process (run_probe)
        workers = (args.workers or default_workers()) if args.device.type == "cpu" else 1
        dataset = args.dataset or "fashion-mnist"
        entries = _probe_grid(args, techniques, depths, dataset, workers)
    elapsed = time.perf_counter() - t0

    for line in table(entries, techniques, depths, ratio_cell, md=False):
        print(line)
    print(f"(max/min RMS of d loss / d block output; healthy when <= L^2, L = blocks; {elapsed:.0f} s)")

    meta = {
        "command": _command_line(args, techniques, depths, dataset),
        "source": f"of trained weights {extra['weights']}" if extra else "at initialisation",
        "init": "trained weights" if extra else "default init",
        "techniques": techniques,
        "depths": depths,
        "dataset": dataset,
        "batches": args.batches,
        "batch_size": args.batch_size,
        "width": args.width,
        "seed": args.seed,
        "dtype": args.dtype,
        "workers": workers,
        "device": describe_device(args.device, 1 if workers > 1 else None),
        "torch": torch.__version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 2),
        "cells": len(entries),
        "threshold_rule": "ratio > max(L^2, 10), L = residual blocks",
        **extra,
    }
    out.mkdir(parents=True, exist_ok=True)
    from reslab.probe.plots import plot_gradient_ratio, plot_signal_propagation

    when = "of trained weights" if extra else "at init"
    plot_signal_propagation(entries, out / "signal_propagation.png", when)
    plot_gradient_ratio(entries, out / "gradient_ratio.png", when)
    write_probe_file(out / "probe.json", meta, [entry_to_dict(e) for e in entries])
    atomic_write_text(out / "probe.md", render_markdown(entries, techniques, depths, meta))
    print(f"wrote {out}/probe.md, probe.json, signal_propagation.png, gradient_ratio.png")
    return 0


def _probe_grid(
    args: argparse.Namespace, techniques: list[str], depths: list[int], dataset: str, workers: int
) -> list[ProbeEntry]:
    from reslab.engine.data import load_arrays
    from reslab.probe.runner import cell_cost, make_batches, run_probe

    ds = load_arrays(dataset, args.data_dir)
    try:
        batches = make_batches(ds.train_x, ds.train_y, ds.mean, ds.std, args.batches, args.batch_size, args.seed)
    except ValueError as e:
        raise UsageError(f"{e}; use fewer --batches or a smaller --batch-size") from None
    cells = len(techniques) * len(depths)
    if not args.no_progress:
        print(
            f"probing {len(techniques)} techniques x depths {','.join(map(str, depths))} on {dataset} "
            f"({args.batches} x {args.batch_size} images, {args.dtype}, {workers} worker(s) on {args.device})",
            file=sys.stderr,
            flush=True,
        )
    progress = _CellProgress(
        sum(cell_cost(d, args.batches) for d in depths) * len(techniques), cells, not args.no_progress
    )
    try:
        return run_probe(
            techniques,
            depths,
            batches,
            ds.num_classes,
            width=args.width,
            seed=args.seed,
            dtype=args.dtype,
            workers=workers,
            on_done=progress,
            device=args.device,
        )
    finally:
        progress.close()
