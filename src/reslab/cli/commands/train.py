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

from reslab.engine.config import TrainConfig, cli_options, parse_assignments, read_config_file

NAME = "train"
HELP = "train a model with a technique and write a run folder"
ORDER = 10

EXIT_DIVERGED = 3

# every TrainConfig field with help text, as --option-name (help and defaults from the field)
_OPTIONS: dict[str, dict[str, Any]] = cli_options()


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
    from reslab.engine.train import train

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
    status = _report_outcome(summary, args.out)
    if summary.get("world_size", 1) > 1:
        _leave_distributed(status)
    return status


def _report_outcome(summary: dict, out: str) -> int:
    """Say how the run ended (rank 0 only) and return the command's exit status."""
    if summary.get("world_size", 1) > 1 and _rank() != 0:
        return 0 if summary["status"] == "completed" else EXIT_DIVERGED
    if summary["status"] == "diverged":
        print(
            f"reslab train: diverged in epoch {summary['diverged_epoch']} (non-finite loss); "
            f"metrics of earlier epochs are in {out}/metrics.jsonl. Try a lower --lr.",
            file=sys.stderr,
        )
        return EXIT_DIVERGED
    print(json.dumps(summary))
    return 0


def _leave_distributed(status: int) -> None:
    """End a torchrun worker without the interpreter's teardown. Its files are written and its
    process group destroyed, but gloo's threads can still race the teardown of the C++ objects
    around them: 1 run in 24 aborted that way on the loaded 2-core machine (rank 1, SIGABRT,
    after a completed run), which torchrun reports as a failed job."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))
