"""Write report.md, report.html, results.jsonl, summary.csv and figures from the run folders of a
'reslab compare' results folder, without training. Works on an incomplete grid (it lists what
is missing) and merges the runs of several folders (shards copied from several machines)."""

from __future__ import annotations

import argparse

from reslab.errors import UsageError

NAME = "report"
HELP = "regenerate the comparison report from stored results"
ORDER = 21


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", help="results folder written by 'reslab compare --out'")
    parser.add_argument(
        "--merge",
        nargs="+",
        default=[],
        metavar="DIR",
        help="more results folders (e.g. shards from other machines) whose runs join this report",
    )
    parser.add_argument(
        "--target-acc", type=float, default=None, help="validation accuracy target (default: the grid's, else 0.9)"
    )
    parser.add_argument(
        "--interval",
        choices=("t", "bootstrap"),
        default=None,
        help="confidence intervals from the t distribution or a paired bootstrap (default: the grid's, else t)",
    )


def run(args: argparse.Namespace) -> int:
    from reslab.report import build_report

    try:
        files = build_report(args.results, extra_dirs=args.merge, target_acc=args.target_acc, method=args.interval)
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(str(e)) from None
    if files.missing:
        print(f"incomplete grid: {len(files.missing)} runs missing or unfinished (listed in the report)")
    print(f"wrote {files.report_md}, {files.report_html}, {files.summary_csv}, {files.results_jsonl}")
    return 0
