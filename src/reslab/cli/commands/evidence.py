"""Run the project's evidence study, one budgeted call at a time: do the article's techniques (scale,
norm, fusion) and the literature's (skipinit, layerscale) change test accuracy against baseline at 20,
56 and 110 layers, full width, on all of Fashion-MNIST, trained until baseline levels off?

Each call trains what fits in --budget (start-up included) on this machine's GPU, records every
finished run in OUT/runs.jsonl (its config, final metrics, curve, divergence and card; no weights),
and rewrites OUT/summary.json (the decision table: model, technique, epochs, seeds, difference and
interval in pp, verdict, baseline's accuracy, cards) and OUT/study.md. The next call, on any card,
reads them and continues the same study; a recorded run is never trained again. The training length
is measured first (baseline at 10, 20 and 40 epochs: the shortest after which doubling gains less
than the 0.5 pp margin), then seeds are added six at a time (looks at 6, 12, 18 and 24) until every
row is decided under the table-wide rule (docs/decision-rule.md). Runs of another card are pooled
only where baseline's accuracy on both cards agrees within seed noise (Welch's test, and a
difference below the margin); otherwise that card's rows stand apart, and the summary says so.

--plan says what the next call would train here and writes nothing; --no-train rewrites
summary.json and study.md from runs.jsonl. Exit status: 0 the call trained what fitted (or nothing
was left), 1 some run failed with an error (listed; re-run to retry), 2 usage error (one line, e.g.
a damaged runs.jsonl or summary.json, or no GPU without --device cpu), 130 interrupted (Ctrl-C), 143
terminated (SIGTERM); every run finished before a stop is recorded.
"""

from __future__ import annotations

import argparse
import time

from reslab.errors import UsageError

NAME = "evidence"
HELP = "run the project's evidence study for one budgeted call (GPU), adding to docs/evidence"
ORDER = 25


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--budget", default="8m", help="wall time of this call, start-up included, e.g. 8m or 540s (default 8m)"
    )
    parser.add_argument(
        "--out", "-o", default="docs/evidence", help="the study's folder: runs.jsonl, summary.json, study.md"
    )
    parser.add_argument(
        "--work",
        default=None,
        help="scratch folder for the run folders and checkpoints (default results/evidence-work; never committed)",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when visible), cuda, cuda:N, or cpu to allow it")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of the training process")
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--plan", action="store_true", help="say what the next call would train on this machine; write nothing"
    )
    what.add_argument(
        "--no-train", action="store_true", help="rewrite summary.json and study.md from runs.jsonl; train nothing"
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    from pathlib import Path

    from reslab.paths import check_writable_dir
    from reslab.study.presets import parse_duration

    budget = parse_duration(args.budget)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; give the study's folder (default docs/evidence)")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    from reslab.report.evidence import write_study_report
    from reslab.study import evidence_run

    if args.plan:
        from reslab.engine.devices import describe_device, pick_device

        try:
            info = describe_device(pick_device(args.device))
        except ValueError as e:
            raise UsageError(str(e)) from None
        if info["type"] == "cpu" and args.device == "auto":
            print("note: no GPU is visible here, so a call would refuse to train (it would with --device cpu)")
        if not out.is_dir():
            print(f"note: {out} does not exist, so no run is recorded there (the study is docs/evidence of a checkout)")
        for line in evidence_run.plan_call(out, info["name"], budget_s=budget):
            print(line)
        return 0
    check_writable_dir(out)
    if args.no_train:
        summary = evidence_run.rebuild(out, report=write_study_report)
        print(f"wrote {out / 'summary.json'} and {out / 'study.md'} from {summary['runs']} runs")
        return 0
    work = Path(args.work) if args.work else evidence_run.DEFAULT_WORK
    check_writable_dir(work, option="--work")
    say = None if args.quiet else (lambda line: print(line, flush=True))
    result = evidence_run.run_call(
        out,
        budget_s=budget,
        work=work,
        device=args.device,
        threads=args.threads,
        report=write_study_report,
        say=say,
        started=started,
        allow_cpu=args.device != "auto",
    )
    s = result.summary
    print(
        f"evidence: {len(result.recorded)} runs recorded by this call, {s['runs']} in all; {s['decided']} of "
        f"{len(s['rows'])} rows decided; {out / 'summary.json'}, {out / 'study.md'}"
    )
    return 1 if result.failed else 0
