"""Train a grid of techniques x seeds (x models) and report which technique converges faster
and ends better than baseline, with confidence intervals.

With no options it runs the 'quick' preset (baseline, scale, norm, fusion on a Fashion-MNIST
subset with a small ResNet-8, 4 epochs, 3 seeds: 12 runs, about 290 CPU-seconds shared by 2
processes). '--preset paper' runs resnet20/56/110 with every technique, full data, 5 seeds (for
a GPU). Giving any grid or training option without --preset starts from the training engine's
defaults instead (resnet20, full data); '--preset quick --epochs 6' changes one setting of a
preset.

Re-running the same command resumes: finished runs are kept, interrupted ones continue from
their checkpoints. '--shard i/n' trains every n-th run, for n machines sharing one --out.
Exit status: 0 all runs finished (diverged runs count as finished results), 1 some run
failed with an error (listed in the report; re-run to retry), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from reslab.errors import UsageError
from reslab.paths import check_writable_dir

NAME = "compare"
HELP = "train techniques x seeds and report the differences with confidence intervals"
ORDER = 20

# Training options offered directly (the rest through --set KEY=VALUE or --config FILE).
_TRAIN_OPTIONS: dict[str, dict[str, Any]] = {
    "dataset": {"help": "fashion-mnist, cifar10, cifar100, digits or folder:PATH"},
    "data_dir": {"help": "folder holding the dataset's files"},
    "epochs": {"type": int, "help": "epochs per run"},
    "batch_size": {"type": int, "help": "batch size"},
    "lr": {"type": float, "help": "peak learning rate"},
    "width": {"type": float, "help": "model width multiplier"},
    "train_subset": {"type": int, "help": "train on the first N training images only"},
    "val_size": {"type": int, "help": "validation images held out of train (0 = use the test set)"},
    "probe_every": {"type": int, "metavar": "K", "help": "record per-block gradient norms every K steps (0 = off)"},
    "device": {"help": "auto, cpu, cuda or cuda:N"},
}
_GRID_OPTIONS = ("models", "techniques", "seeds", "target_acc")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from reslab.compare import PRESETS

    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="quick (default when no grid or training option is given) or paper",
    )
    parser.add_argument("--models", "--model", dest="models", help="model(s), comma-separated, e.g. resnet20,resnet56")
    parser.add_argument("--techniques", help="comma-separated techniques or 'all' (baseline is always included)")
    parser.add_argument("--seeds", help="N (seeds 0..N-1) or a comma-separated list, e.g. 0,1,2")
    parser.add_argument("--target-acc", type=float, help="validation accuracy for time-to-target, e.g. 0.9")
    parser.add_argument("--out", "-o", help="results folder (default: results/PRESET or results/compare)")
    parser.add_argument("--jobs", "-j", type=int, help="runs trained at once, in processes (cores are shared)")
    parser.add_argument("--shard", metavar="I/N", help="train only the I-th of N deterministic parts of the grid")
    parser.add_argument(
        "--interval", choices=("t", "bootstrap"), default="t", help="confidence intervals: t (default) or bootstrap"
    )
    parser.add_argument("--config", help="YAML or TOML file of training options shared by every run")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any training option (see 'reslab train --help'), e.g. --set label_smoothing=0 (repeatable)",
    )
    for name, kw in _TRAIN_OPTIONS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **kw)
    parser.add_argument("--no-report", action="store_true", help="skip the report at the end")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output")


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def parse_seeds(text: str) -> list[int]:
    try:
        if "," in text:
            seeds = [int(p) for p in _split(text)]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        raise UsageError(f"--seeds takes N >= 1 (seeds 0..N-1) or a list like 0,1,2, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds lists a seed twice: {text!r}")
    return seeds


def build_grid(args: argparse.Namespace) -> tuple[Any, int, str]:
    """(Grid, jobs, out) from the options: preset or engine defaults < --config < options < --set."""
    from reslab.compare import PRESETS, Grid, resolve_techniques
    from reslab.config import parse_assignments, read_config_file

    explicit_train = {k: getattr(args, k) for k in _TRAIN_OPTIONS if getattr(args, k) is not None}
    custom = bool(explicit_train or args.config or args.set or any(getattr(args, k) for k in _GRID_OPTIONS))
    preset_name = args.preset or (None if custom else "quick")
    if preset_name:
        p = PRESETS[preset_name]
        base: dict[str, Any] = {
            "models": list(p["models"]),
            "techniques": list(p["techniques"]),
            "seeds": list(p["seeds"]),
            "target_acc": p["target_acc"],
            "train": dict(p["train"]),
            "jobs": p["jobs"],
        }
    else:
        base = {
            "models": ["resnet20"],
            "techniques": ["baseline", "scale", "norm", "fusion"],
            "seeds": [0, 1, 2],
            "target_acc": 0.9,
            "train": {},
            "jobs": 1,
        }
    train = dict(base["train"])
    if args.config:
        train.update(read_config_file(args.config))
    train.update(explicit_train)
    train.update(parse_assignments(args.set, "--set", "lr=0.05"))
    for k in ("model", "technique", "seed"):
        if k in train:
            raise UsageError(f"{k} is set per run by the grid; use --{k}s instead of setting {k} in the options")
    models = _split(args.models) if args.models else base["models"]
    if not models:
        raise UsageError("--models is empty; give e.g. --models resnet20")
    techniques = resolve_techniques(_split(args.techniques) if args.techniques else base["techniques"])
    seeds = parse_seeds(args.seeds) if args.seeds else base["seeds"]
    target = args.target_acc if args.target_acc is not None else base["target_acc"]
    if not 0.0 < target <= 1.0:
        raise UsageError(f"--target-acc is a fraction in (0, 1], e.g. 0.9, got {target}")
    grid = Grid(models, techniques, seeds, train, target, args.interval, preset_name if not custom else None)
    if preset_name and custom:
        grid.preset = f"{preset_name} (modified)"
    jobs = args.jobs if args.jobs is not None else base["jobs"]
    out = args.out or f"results/{preset_name or 'compare'}"
    return grid, jobs, out


def run(args: argparse.Namespace) -> int:
    check_writable_dir(args.out or "results")  # before any work (reslab.paths)
    from reslab.compare import fmt_duration, parse_shard, run_grid

    t0 = time.perf_counter()
    grid, jobs, out = build_grid(args)
    shard = parse_shard(args.shard)
    progress = not args.quiet
    if progress:
        print(
            f"compare: {', '.join(grid.models)} x {', '.join(grid.techniques)} x seeds "
            f"{', '.join(map(str, grid.seeds))}" + (f" [preset {grid.preset}]" if grid.preset else ""),
            file=sys.stderr,
        )
    try:
        res = run_grid(grid, out, jobs=jobs, shard=shard, progress=progress, report=not args.no_report)
    except KeyboardInterrupt:
        print(
            f"reslab compare: interrupted; finished runs are kept, re-run the same command to resume ({out})",
            file=sys.stderr,
        )
        return 130
    wall = time.perf_counter() - t0
    print(
        f"{len(res.ran)} runs trained ({len(res.diverged)} diverged), {len(res.skipped)} already finished, "
        f"{len(res.failed)} failed; wall-clock {fmt_duration(wall)}"
    )
    if res.report is not None:
        if res.report.missing:
            print(f"incomplete grid: {len(res.report.missing)} runs missing or unfinished (see the report)")
        print(f"report: {res.report.report_md}  {res.report.report_html}")
        print(f"tables: {res.report.summary_csv}  {res.report.results_jsonl}")
    if res.failed:
        names = ", ".join(c.name for c in res.failed)
        print(f"reslab compare: {len(res.failed)} runs failed ({names}); re-run to retry them", file=sys.stderr)
        return 1
    return 0
