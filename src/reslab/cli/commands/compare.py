"""Compare residual techniques with baseline and decide, per model, whether each is better,
worse or equivalent (within a margin), with intervals that stay honest at a few seeds.

With no options it runs the 'quick' preset: baseline, scale, norm and fusion on a shallow
ResNet-8 and a deep ResNet-56 (quarter width, a 4,000-image Fashion-MNIST subset, one epoch of
125 steps), 6 seeds read once, in about 5 minutes on a 2-core CPU: early training, and at 6 seeds
most rows stay undecided ('--preset quick --max-seeds 24 --budget 15m' reads them at 6, 12, 18 and 24 seeds and
decides about 4 of 6; benchmarks/README.md, "The quick preset"). '--preset paper' runs
resnet20/56/110 with baseline, scale, norm and fusion on full data (for a GPU). Any grid or training option
without --preset starts a custom grid from the training engine's defaults (resnet20, full
data, fixed seeds); '--preset quick --epochs 3' changes one setting of a
preset. The header states the preset, the grid and an estimated time before training.

Sequential seeds (--until-decided, the presets' default): seeds are added one round at a
time; a technique stops when its repeated confidence interval for the difference in test
accuracy at the end of training, over the seeds where both runs finished, lies above 0 (better), below 0
(worse) or inside +-margin (equivalent), when it diverges often enough where baseline does
not (worse), or when --max-seeds or --budget is reached (undecided). A technique that
diverged where baseline did not is never equivalent or better. With --error-rate table (the
default) the chance that any row of the decision table is wrong is at most --alpha, however
many rounds are looked at; --error-rate row bounds each comparison instead
(docs/decision-rule.md).

Re-running the same command resumes: finished runs are kept, interrupted ones continue from
their checkpoints. '--shard i/n' trains one of n parts of the grid, balanced by estimated time.

Launchers: any number of compare processes on one --out cooperate (each run is claimed, then
trained once). '--launcher slurm' submits --workers of them as a Slurm job array (through
submitit; logs in OUT/slurm; a worker stopped by the time limit requeues itself and resumes),
'--launcher ray' runs them as Ray tasks (--ray-address auto for a running cluster); the
command waits for them and prints the usual summary. --out must be a folder every worker sees.
A cluster that cannot be reached is one line and exit status 2 within --connect-timeout
(nothing is written to --out); one lost while the grid runs (Ray's head gone, every Slurm
task cancelled) is one line naming the runs finished and interrupted, and exit status 75.
Threads per run are the same whichever launcher trains them: --set threads=N, else
--cpus-per-task / --jobs, else this machine's cores / --jobs (what a local run uses).
Exit status: 0 all runs finished (diverged runs count as finished results), 1 some run
failed with an error (listed in the report; re-run to retry), 2 usage error, 75 the cluster
was lost (re-run the same command to resume), 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM, e.g. Slurm preemption; handled like Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from reslab.engine.config import cli_options
from reslab.errors import UsageError
from reslab.paths import check_writable_dir

NAME = "compare"
HELP = "train techniques x seeds and report the differences with confidence intervals"
ORDER = 20

# Training options offered directly (the rest through --set KEY=VALUE or --config FILE); help and
# defaults from TrainConfig's fields. An option left out takes the preset's value in a preset.
_TRAIN_OPTIONS: dict[str, dict[str, Any]] = cli_options(
    (
        "dataset",
        "data_dir",
        "epochs",
        "batch_size",
        "lr",
        "width",
        "train_subset",
        "val_size",
        "probe_every",
        "device",
        "test_subset",
        "evals_per_epoch",
    ),
    default_words=" without --preset",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from reslab.study.presets import PRESETS

    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="quick (default when no grid or training option is given) or paper",
    )
    parser.add_argument("--models", "--model", dest="models", help="model(s), comma-separated, e.g. resnet20,resnet56")
    parser.add_argument("--techniques", help="comma-separated techniques or 'all' (baseline is always included)")
    parser.add_argument("--seeds", help="N (seeds 0..N-1) or a comma-separated list, e.g. 0,1,2")
    parser.add_argument(
        "--target-acc",
        help="validation accuracy for epochs to target, e.g. 0.9, or 'auto' (the default): per model, 95%% of "
        "baseline's mean validation accuracy at the end of training",
    )
    parser.add_argument(
        "--until-decided",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add seeds until each technique is decided (default in the presets; --seeds is then the first look)",
    )
    parser.add_argument(
        "--max-seeds",
        type=int,
        help="most seeds a sequential comparison may use (default 6; with the quick preset, "
        "--preset quick --max-seeds 24 reads the seeds at 6, 12, 18 and 24)",
    )
    parser.add_argument(
        "--margin",
        type=float,
        help="equivalence margin in percentage points of test accuracy (default: quick 1, paper and custom grids 0.5)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        help="chance of a wrong decision: in the whole decision table, or per comparison with --error-rate row "
        "(default 0.05)",
    )
    parser.add_argument(
        "--error-rate",
        choices=("table", "row"),
        default=None,
        help="table (default): the chance that ANY row of the decision table is wrong is at most --alpha (alpha "
        "is shared by the comparisons, a step-down); row: each comparison on its own (more power, more wrong rows "
        "in a big table)",
    )
    parser.add_argument(
        "--budget", help="wall-time budget for training, e.g. 30m or 2h; then undecided techniques stop"
    )
    parser.add_argument("--out", "-o", help="results folder (default: results/PRESET or results/compare)")
    parser.add_argument("--jobs", "-j", type=int, help="runs trained at once, in processes (cores are shared)")
    parser.add_argument(
        "--pack",
        metavar="K",
        help="train up to K seeds of one model and technique in a process as one packed model (each run keeps "
        "its own folder and results), or 'auto': 1 on the CPU, on a GPU the size a short probe of packed steps "
        "finds fastest (the default)",
    )
    parser.add_argument(
        "--shard", metavar="I/N", help="train only the I-th of N parts of the grid (balanced by estimated time)"
    )
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
    parser.add_argument(
        "--estimate",
        action="store_true",
        help="measure this machine (the timing pass and, on a GPU, the pack probe, kept in --out for the real "
        "run), print the estimated training time and stop: nothing is trained",
    )
    parser.add_argument("--no-report", action="store_true", help="skip the report at the end")
    parser.add_argument(
        "--no-probe", action="store_true", help="skip the gradient-flow probe at initialisation (depths 56 and 110)"
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    _add_launcher_arguments(parser)


def _add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "launchers", "run the grid as N workers on a cluster engine (the results folder must be shared)"
    )
    g.add_argument(
        "--launcher",
        choices=("local", "slurm", "ray"),
        default="local",
        help="local (default: processes of this command), slurm (a job array, via submitit) or ray (Ray tasks)",
    )
    g.add_argument(
        "--workers",
        type=int,
        help="workers to start (default: the runs of the first round, at most 16, on ray at most what the cluster "
        "runs at once); each trains one run at a time (ray: --jobs at once)",
    )
    g.add_argument("--cpus-per-task", type=int, metavar="N", help="CPUs per worker (slurm, ray; ray's default 1)")
    g.add_argument("--gpus-per-task", type=int, metavar="N", help="GPUs per worker (slurm, ray; default 0)")
    g.add_argument(
        "--retries",
        type=int,
        metavar="N",
        help="times a worker is started again: ray after its process died, slurm after its time limit (default 3)",
    )
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--time", metavar="LIMIT", help="Slurm time limit per worker: minutes or HH:MM:SS (default 4:00:00)")
    g.add_argument("--mem", help="Slurm memory per worker, e.g. 32G")
    g.add_argument(
        "--slurm-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other sbatch option, e.g. --slurm-arg account=myproj (repeatable)",
    )
    # submitit's executor: 'local' and 'debug' run the Slurm launcher's code on this machine (tests)
    g.add_argument("--submitit-cluster", choices=("slurm", "local", "debug"), default=None, help=argparse.SUPPRESS)
    g.add_argument(
        "--connect-timeout",
        type=float,
        metavar="SECONDS",
        help="how long to wait for the cluster to answer before saying why it does not (default 15)",
    )
    g.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="Ray cluster to use, e.g. auto or ray://host:10001 (default: start a local one)",
    )


_SLURM_ONLY = ("partition", "time", "mem", "slurm_arg", "submitit_cluster")
_RAY_ONLY = ("ray_address",)
_ENGINE_ONLY = ("workers", "cpus_per_task", "gpus_per_task", "retries", "connect_timeout")


def _resources(args: argparse.Namespace) -> Any:
    """The launcher's Resources from the options; options of another launcher are refused."""
    from reslab.study import launch

    given = {k for k in (*_SLURM_ONLY, *_RAY_ONLY, *_ENGINE_ONLY) if getattr(args, k) not in (None, [])}
    if args.launcher == "local":
        if given:
            names = ", ".join("--" + k.replace("_", "-") for k in sorted(given))
            raise UsageError(
                f"{names} {'applies' if len(given) == 1 else 'apply'} only to --launcher slurm or ray "
                "(locally, --jobs sets how many runs train at once)"
            )
        return None
    other = _RAY_ONLY if args.launcher == "slurm" else _SLURM_ONLY
    if wrong := sorted(k for k in given if k in other):
        names = ", ".join("--" + k.replace("_", "-") for k in wrong)
        raise UsageError(f"{names} {'does' if len(wrong) == 1 else 'do'} not apply to --launcher {args.launcher}")
    for k in ("workers", "cpus_per_task", "jobs"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be at least 1, got {getattr(args, k)}")
    for k in ("gpus_per_task", "retries"):
        if getattr(args, k) is not None and getattr(args, k) < 0:
            raise UsageError(f"--{k.replace('_', '-')} must be 0 or more, got {getattr(args, k)}")
    if args.connect_timeout is not None and not 0 < args.connect_timeout <= 3600:
        raise UsageError(f"--connect-timeout takes seconds between 0 and 3600, e.g. 15, got {args.connect_timeout:g}")
    jobs = args.jobs or 1
    if args.launcher == "slurm" and jobs > 1:
        # Slurm signals every process of a task; the extra job processes would die on the
        # time-limit signal instead of stopping cleanly. More tasks do the same work.
        raise UsageError("--launcher slurm runs one run at a time per worker; ask for more --workers instead of --jobs")
    res = launch.Resources(
        workers=args.workers,
        jobs=jobs,
        pack=args.pack,
        cpus_per_task=args.cpus_per_task,
        gpus_per_task=args.gpus_per_task,
        retries=3 if args.retries is None else args.retries,
        partition=args.partition,
        mem=launch.parse_mem(args.mem) if args.mem else None,
        slurm_args=launch.parse_slurm_args(args.slurm_arg),
        submitit_cluster=args.submitit_cluster or "slurm",
        ray_address=args.ray_address,
    )
    if args.connect_timeout is not None:
        res.connect_timeout_s = args.connect_timeout
    if args.time:
        res.time_min = launch.parse_time(args.time)
    return res


#: options passed to grid_from_options under their own names
_SAME_NAMES = (
    "preset",
    "models",
    "techniques",
    "seeds",
    "target_acc",
    "until_decided",
    "max_seeds",
    "alpha",
    "error_rate",
    "budget",
    "interval",
    "jobs",
    "out",
)


def build_grid(args: argparse.Namespace) -> tuple[Any, int, str]:
    """(Grid, jobs, out) from the options, by the rules of :func:`reslab.study.presets.grid_from_options`."""
    from reslab.study.presets import grid_from_options

    setup = grid_from_options(
        **{k: getattr(args, k) for k in _SAME_NAMES},
        train={k: getattr(args, k) for k in _TRAIN_OPTIONS},
        config_file=args.config,
        assignments=args.set,
        margin_pp=args.margin,
    )
    return setup.grid, setup.jobs, setup.out


def run(args: argparse.Namespace) -> int:
    check_writable_dir(args.out or "results")  # before any work (reslab.paths)
    from reslab.study.grid import parse_shard

    t0 = time.perf_counter()
    grid, jobs, out = build_grid(args)
    shard = parse_shard(args.shard)
    from reslab.study.packing import check_pack_option, parse_pack

    args.pack = parse_pack(args.pack)
    check_pack_option(grid, args.pack)
    launcher = _resources(args)
    if args.estimate and launcher is not None:
        raise UsageError("--estimate measures this machine; run it without --launcher (on a machine like the workers')")
    # every usage error before the header: each run's settings, the results folder, and for a
    # launcher its engine (installed, reachable) and the folder as its workers see it
    from reslab.study.grid import check_results

    for cell in grid.cells():
        grid.config(cell)
    if launcher is None:
        # the device must exist here (a launcher's workers run elsewhere, on their own devices)
        from reslab.engine.devices import pick_device

        pick_device(str(grid.train.get("device") or "auto"))
    check_results(Path(out), grid)
    session = None
    if launcher is not None:
        from reslab.study.launch import Session

        session = Session(args.launcher, grid, out, launcher)
    try:
        return _run(args, grid, jobs, out, shard, launcher, session, t0)
    finally:
        if session is not None:
            session.close()


def _run(
    args: argparse.Namespace,
    grid: Any,
    jobs: int,
    out: str,
    shard: tuple[int, int] | None,
    launcher: Any,
    session: Any,
    t0: float,
) -> int:
    from reslab.report.build import build_report
    from reslab.study.compare import estimate_grid, run_grid
    from reslab.study.estimate import fmt_duration
    from reslab.study.launch.common import LOST_STATUS, ClusterLost

    progress = not args.quiet
    if progress:
        plan = grid.plan()
        scope = "for the whole decision table" if grid.error_rate == "table" else "per comparison"
        looks = (
            f"{plan.min_seeds} seeds, read once"
            if plan and plan.looks == (plan.max_seeds,)
            else f"seeds added until decided ({', '.join(map(str, plan.looks))})"
            if plan
            else ""
        )
        seeds = (
            f"{looks} (alpha {plan.alpha:g} {scope}, margin +-{100 * plan.margin:g} pp)"
            if plan
            else f"seeds {', '.join(map(str, grid.seeds))}"
        )
        pairs = _count(len(grid.models) * len(grid.techniques), "model x technique pair")
        print(
            f"compare: {'preset ' + grid.preset if grid.preset else 'custom grid'}: {', '.join(grid.models)} x "
            f"{', '.join(grid.techniques)} ({pairs}); "
            f"{seeds}" + (f"; training budget {fmt_duration(grid.budget_s)}" if grid.budget_s else ""),
            file=sys.stderr,
        )
    try:
        if launcher is None and args.estimate:
            words = estimate_grid(grid, out, jobs=jobs, pack=args.pack, progress=progress)
            print(f"{'preset ' + grid.preset if grid.preset else 'this grid'}: {words}")
            return 0
        if launcher is None:
            res = run_grid(
                grid,
                out,
                jobs=jobs,
                pack=args.pack,
                shard=shard,
                progress=progress,
                report=None if args.no_report else build_report,
                probe_init=not args.no_probe,
            )
        else:
            res, workers = session.run(
                shard=shard,
                progress=progress,
                report=None if args.no_report else build_report,
                probe_init=not args.no_probe,
            )
            for w in workers:
                if w.error:
                    print(f"reslab compare: {w.name} failed: {w.error}", file=sys.stderr)
    except ClusterLost as e:
        print(f"reslab compare: {e}", file=sys.stderr)
        return LOST_STATUS
    except KeyboardInterrupt as e:
        from reslab.signals import exit_status, stop_word

        if launcher is None or launcher.submitit_cluster != "slurm" or args.launcher != "slurm":
            # (Slurm's workers go on without this process; the launcher said so)
            print(
                f"reslab compare: {stop_word(e)}; finished runs are kept, re-run the same command to resume ({out})",
                file=sys.stderr,
            )
        return exit_status(e)
    wall = time.perf_counter() - t0
    print(
        f"{_count(len(res.ran), 'run')} trained ({len(res.diverged)} diverged), {len(res.skipped)} already finished, "
        f"{len(res.failed)} failed; wall-clock {fmt_duration(wall)}"
    )
    if res.budget_spent:
        print(
            f"training budget of {fmt_duration(grid.budget_s)} reached: techniques still undecided stopped "
            f"adding seeds; re-run the same command to continue them"
        )
    if res.report is not None:
        if res.report.missing:
            print(f"incomplete grid: {len(res.report.missing)} runs missing or unfinished (see the report)")
        for line in res.report.verdicts:
            print(line)
        print(f"report: {res.report.report_md}  {res.report.report_html}")
        print(f"tables: {res.report.summary_csv}  {res.report.results_jsonl}")
    elif res.report_note:
        print(f"report: not written by this process: {res.report_note}")
    if res.failed:
        names = ", ".join(c.name for c in res.failed)
        print(f"reslab compare: {len(res.failed)} runs failed ({names}); re-run to retry them", file=sys.stderr)
        return 1
    if launcher is not None and any(w.error for w in workers):
        return 1
    return 0


def _count(n: int, noun: str) -> str:
    """'1 run', '3 runs'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
