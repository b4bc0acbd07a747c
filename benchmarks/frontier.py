"""Rows decided against minutes: what a budget buys, read from one long sequential grid.

A sequential ``reslab compare`` trains the same cells in the same order whatever its budget (the
budget only stops it), so the runs a grid had finished after T minutes are what ``--budget T``
would have trained. This replays the grid's decisions at each T from the runs finished by then
(a run's end: its ``summary.json`` written; the start: the grid's first run starting, less the
start-up the command printed before it)::

    reslab compare --preset quick --max-seeds 24 --budget 20m --out /tmp/frontier/new
    python benchmarks/frontier.py /tmp/frontier/new --minutes 3,6,10,20 --startup 40

``--plan MIN:MAX:STEP`` decides with another plan than the grid's (the runs must be the same:
e.g. the quick preset's single look at 6 seeds read from the longer grid's first 6 seeds).
Prints a markdown table: minutes, runs finished, rows decided, and each row's verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reslab.study.decisions import chance_of, table_outcomes
from reslab.study.plan import Plan
from reslab.study.results import RUNS_DIR, STARTS_FILE, collect, run_value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results")
    p.add_argument("--minutes", default="3,6,10,20")
    p.add_argument("--startup", type=float, default=0.0, help="seconds the command ran before its first run")
    p.add_argument("--plan", help="MIN:MAX:STEP seeds, to decide with another plan than the grid's")
    args = p.parse_args(argv)
    root = Path(args.results)
    grid, runs = collect([root])
    assert grid is not None, f"{root} holds no grid.json"
    seq = dict(grid["sequential"])
    if args.plan:
        lo, hi, step = (int(x) for x in args.plan.split(":"))
        seq.update(min_seeds=lo, max_seeds=hi, step=step)
    plan = Plan(**seq)
    starts = [
        json.loads(line)["time"]
        for f in (root / RUNS_DIR).glob(f"*/{STARTS_FILE}")
        for line in f.read_text().splitlines()
        if line.strip()
    ]
    t0 = min(starts) - args.startup
    ends = {c: (root / RUNS_DIR / c.name / "summary.json").stat().st_mtime - t0 for c in runs}
    seeds = [int(s) for s in grid["seeds"]]
    names = [f"{m} {t}" for m in grid["models"] for t in grid["techniques"][1:]]
    print(f"| minutes | runs finished | rows decided | {' | '.join(names)} |")
    print("|---" * (3 + len(grid["models"]) * (len(grid["techniques"]) - 1)) + "|")
    for minutes in (float(m) for m in args.minutes.split(",")):
        done = {c: r for c, r in runs.items() if r.finished and ends[c] <= 60 * minutes}
        status = {c: r.status for c, r in done.items()}
        values = {c: v for c, r in done.items() if (v := run_value(r)) is not None}
        chances = {m: chance_of([r.summary for c, r in done.items() if c.model == m]) for m in grid["models"]}
        outs = table_outcomes(
            plan, grid.get("error_rate") or "table", seeds, status, values, grid["models"], grid["techniques"], chances
        )
        cells = []
        for m in grid["models"]:
            for t in grid["techniques"][1:]:
                o = outs[(m, t)]
                iv = f" [{100 * o.interval[0]:+.1f}, {100 * o.interval[1]:+.1f}]" if o.interval else ""
                cells.append(f"{o.decision} ({o.n_used or o.seeds}){iv}")
        decided = sum(o.decision != "undecided" for o in outs.values())
        print(f"| {minutes:g} | {len(done)} | {decided} of {len(outs)} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
