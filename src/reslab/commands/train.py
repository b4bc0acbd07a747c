"""Train a model with a technique and write a run folder (config.yaml, metrics.jsonl,
summary.json, model.safetensors, checkpoint/).

Options come from, in increasing priority: the defaults, a YAML or TOML --config file,
and the command line. --resume continues the run in --out from its last complete epoch
with the saved configuration. Exit status: 0 completed, 2 usage error, 3 diverged
(non-finite loss), 130 interrupted, 143 terminated (SIGTERM,
handled like Ctrl-C). Multi-process: torchrun --nproc_per_node=N -m reslab
train ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from reslab.config import TrainConfig, parse_assignments, read_config_file

NAME = "train"
HELP = "train a model with a technique and write a run folder"
ORDER = 10

EXIT_DIVERGED = 3

# TrainConfig fields exposed as --options (field name -> argparse keyword arguments)
_OPTIONS: dict[str, dict[str, Any]] = {
    "model": {"help": "model name, e.g. resnet20 (default resnet20; see 'reslab models')"},
    "technique": {"help": "residual technique (default baseline; see 'reslab models')"},
    "dataset": {"help": "fashion-mnist (default), cifar10, cifar100, digits or folder:PATH"},
    "data_dir": {
        "help": "folder holding the dataset's files, the only place looked at (an error if it lacks them); "
        "without it: $RESLAB_DATA/NAME, ~/.cache/reslab/NAME, /usr/share/datasets/NAME, then a verified download"
    },
    "epochs": {"type": int, "help": "epochs (default 10)"},
    "batch_size": {"type": int, "help": "global batch size (default 128)"},
    "lr": {"type": float, "help": "peak learning rate (default 0.1)"},
    "momentum": {"type": float, "help": "SGD momentum (default 0.9)"},
    "nesterov": {"action": argparse.BooleanOptionalAction, "help": "Nesterov momentum (default on)"},
    "weight_decay": {"type": float, "help": "weight decay on conv/linear weights (default 5e-4)"},
    "label_smoothing": {"type": float, "help": "label smoothing (default 0.1)"},
    "schedule": {"help": "onecycle (default), cosine or constant"},
    "warmup": {"type": float, "help": "fraction of steps for linear warm-up (default 0.2)"},
    "val_size": {"type": int, "help": "validation images held out of train (default 5000; 0 = test set)"},
    "train_subset": {"type": int, "help": "train on the first N training images only"},
    "test_subset": {"type": int, "help": "test on a fixed N-image part of the test split"},
    "flip": {"action": argparse.BooleanOptionalAction, "help": "random horizontal flip (default: per dataset)"},
    "crop_padding": {"type": int, "help": "random-crop padding in pixels (default: per dataset)"},
    "seed": {"type": int, "help": "random seed (default 0)"},
    "device": {"help": "auto (default), cpu, cuda or cuda:N"},
    "compile": {"action": argparse.BooleanOptionalAction, "help": "torch.compile the model"},
    "channels_last": {"action": argparse.BooleanOptionalAction, "help": "NHWC memory format (default on)"},
    "precision": {"help": "auto (default: bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16"},
    "width": {"type": float, "help": "width multiplier (default 1)"},
    "drop_path_rate": {"type": float, "help": "stochastic depth rate of the last block (default 0)"},
    "init_weights": {
        "metavar": "FILE",
        "help": "start from a plain ResNet's weights (torchvision/timm .pth or .safetensors, or a reslab "
        "model.safetensors) of the same architecture; the technique starts where it keeps their function",
    },
    "probe_every": {"type": int, "metavar": "K", "help": "record per-block gradient norms every K steps"},
    "threads": {"type": int, "help": "CPU threads (default: PyTorch's)"},
    "workers": {"type": int, "help": "DataLoader workers for folder datasets (default 2)"},
    "eval_batch_size": {"type": int, "help": "evaluation batch size (default 1000)"},
    "evals_per_epoch": {"type": int, "help": "validation evaluations per epoch, into evals.jsonl (default 1)"},
    "image_size": {"type": int, "help": "resize folder images to this square size"},
    "tensorboard": {"action": argparse.BooleanOptionalAction, "help": "also write TensorBoard event files"},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", "-o", required=True, help="run folder to write")
    parser.add_argument("--config", help="YAML or TOML file of options (command-line options win)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    parser.add_argument(
        "--technique-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="argument for the technique, e.g. init_value=1e-4 for layerscale (repeatable)",
    )
    for name, kw in _OPTIONS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **kw)


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Defaults < --config file < (for --resume: the saved config) < explicit options."""
    values: dict[str, Any] = {}
    out = Path(args.out)
    if args.resume and (out / "config.yaml").is_file():
        values.update(read_config_file(out / "config.yaml"))
    if args.config:
        values.update(read_config_file(args.config))
    explicit = {k: getattr(args, k) for k in _OPTIONS if getattr(args, k) is not None}
    values.update(explicit)
    if args.technique_arg:
        extra = parse_assignments(args.technique_arg, "--technique-arg", "init_value=1e-4")
        values["technique_args"] = {**(values.get("technique_args") or {}), **extra}
    source = f"config file {args.config}" if args.config else "options"
    return TrainConfig.from_dict(values, source=source)


def run(args: argparse.Namespace) -> int:
    from reslab.errors import UsageError, is_out_of_memory, out_of_memory_message
    from reslab.paths import check_writable_dir

    check_writable_dir(args.out)  # before reading data or building anything
    cfg = build_config(args)
    from reslab.train import train

    progress = False if args.quiet else None
    try:
        summary = train(cfg, args.out, resume=args.resume, overwrite=args.overwrite, progress=progress)
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        raise UsageError(
            out_of_memory_message(cfg.batch_size) + f"; the same command (or --resume) restarts {args.out}"
        ) from None
    except KeyboardInterrupt as e:
        from reslab.signals import exit_status, stop_word

        print(
            f"reslab train: {stop_word(e)}; the last complete epoch is checkpointed, continue with "
            f"reslab train --out {args.out} --resume",
            file=sys.stderr,
        )
        return exit_status(e)
    if summary.get("world_size", 1) > 1 and _rank() != 0:
        return 0 if summary["status"] == "completed" else EXIT_DIVERGED
    if summary["status"] == "diverged":
        print(
            f"reslab train: diverged in epoch {summary['diverged_epoch']} (non-finite loss); "
            f"metrics of earlier epochs are in {args.out}/metrics.jsonl. Try a lower --lr.",
            file=sys.stderr,
        )
        return EXIT_DIVERGED
    print(json.dumps(summary))
    return 0


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))
