"""Do a short grid's verdicts hold when the same models train longer? One row per model x
technique: the short grid's verdict and interval beside the longer grid's, and whether they
contradict.

A contradiction (issue 27's definition) is a short-grid ``better`` or ``worse`` where the longer
grid's interval says the opposite (lies wholly on the other side of 0) or excludes the short
grid's interval (the two do not overlap). ``equivalent`` and ``undecided`` cannot contradict.
Both folders are ``reslab compare`` results; their ``decisions.json`` is read::

    reslab compare --preset quick --max-seeds 24 --budget 20m --out /tmp/frontier/new
    reslab compare --preset quick --epochs 5 --no-until-decided --seeds 6 --no-probe --budget 3h --out /tmp/long/e5
    python benchmarks/agreement.py /tmp/frontier/new /tmp/long/e5
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _rows(folder: str) -> dict[tuple[str, str], dict]:
    data = json.loads((Path(folder) / "decisions.json").read_text(encoding="utf-8"))
    return {(d["model"], d["technique"]): d for d in data}


def _iv(d: dict) -> str:
    lo, hi = d.get("diff_low"), d.get("diff_high")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    return f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"


def contradicts(short: dict, long: dict) -> bool:
    """A better/worse in ``short`` that ``long``'s interval reverses or excludes."""
    if short["decision"] not in ("better", "worse"):
        return False
    s_lo, s_hi, l_lo, l_hi = (
        short.get("diff_low"),
        short.get("diff_high"),
        long.get("diff_low"),
        long.get("diff_high"),
    )
    if None in (s_lo, s_hi, l_lo, l_hi) or not all(math.isfinite(x) for x in (s_lo, s_hi, l_lo, l_hi)):
        return False
    opposite = l_lo > 0 if short["decision"] == "worse" else l_hi < 0
    disjoint = l_hi < s_lo or l_lo > s_hi
    return bool(opposite or disjoint)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("short")
    p.add_argument("long")
    args = p.parse_args(argv)
    short, long = _rows(args.short), _rows(args.long)
    print(
        "| model | technique | short: verdict (seeds) | short: difference, pp [interval] | longer: verdict (seeds) "
        "| longer: difference, pp [interval] | contradiction |"
    )
    print("|---|---|---|---|---|---|---|")
    bad = 0
    for key, s in short.items():
        lg = long.get(key)
        if lg is None:
            continue
        c = contradicts(s, lg)
        bad += c
        left = f"{s['decision']} ({s.get('seeds')}) | {100 * s['diff_mean']:+.2f} {_iv(s)}"
        right = f"{lg['decision']} ({lg.get('seeds')}) | {100 * lg['diff_mean']:+.2f} {_iv(lg)}"
        print(f"| {key[0]} | {key[1]} | {left} | {right} | {'**yes**' if c else 'no'} |")
    print(f"\n{bad} contradiction(s) in {len(short)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
