"""Write report.md, report.html, results.jsonl, summary.csv and figures from the run folders of a
'reslab compare' results folder, without training. Works on an incomplete grid (it lists what
is missing) and merges the runs of several folders (shards copied from several machines).

Given one run folder of 'reslab train' instead, writes that run's training curves (and its
per-block gradient norms when it was trained with --probe-every) to RUN/report/."""

from __future__ import annotations

import argparse

from reslab.errors import UsageError

NAME = "report"
HELP = "regenerate the comparison report from stored results"
ORDER = 21


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "results", help="results folder written by 'reslab compare --out', or a run folder of 'reslab train --out'"
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        default=[],
        metavar="DIR",
        help="more results folders (e.g. shards from other machines) whose runs join this report",
    )
    parser.add_argument(
        "--target-acc",
        type=float,
        default=None,
        help="validation accuracy target for epochs to target (default: the grid's, e.g. auto; else 0.9)",
    )
    parser.add_argument(
        "--interval",
        choices=("t", "bootstrap"),
        default=None,
        help="confidence intervals from the t distribution or a paired bootstrap (default: the grid's, else t)",
    )
    parser.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="RUN",
        help="run folder of one of the grid's models trained long (e.g. 'reslab train --epochs 30 --out RUN'); "
        "the report then says how far baseline was from that run's accuracy (repeat once per model)",
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    path = Path(args.results)
    if not path.exists():
        raise UsageError(f"{path} does not exist; give a results folder of 'reslab compare' or a run folder")
    if not path.is_dir():
        raise UsageError(
            f"{path} is a file; give the folder that holds it (a results folder of 'reslab compare' or a run folder)"
        )
    from reslab.paths import check_writable_dir
    from reslab.report.run_report import is_run_folder, write_run_report

    if is_run_folder(path):
        if args.merge or args.reference:
            raise UsageError(
                "--merge and --reference apply to results folders of 'reslab compare'; a single run folder takes none"
            )
        check_writable_dir(path / "report", option="")
        written = write_run_report(path)
        print(f"wrote {', '.join(str(f) for f in written.files)}")
        return 0

    check_writable_dir(path, option="")  # the report is written beside the runs
    from reslab.report.build import build_report

    try:
        files = build_report(
            args.results,
            extra_dirs=args.merge,
            target_acc=args.target_acc,
            method=args.interval,
            references=args.reference,
        )
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(str(e)) from None
    if files.missing:
        print(f"incomplete grid: {len(files.missing)} runs missing or unfinished (listed in the report)")
    for line in files.verdicts:
        print(line)
    print(f"wrote {files.report_md}, {files.report_html}, {files.summary_csv}, {files.results_jsonl}")
    return 0
