"""The evidence study in words: ``study.md`` beside its summary.json, and the README's section
"What reslab found", both laid out from summary.json alone (:mod:`reslab.study.evidencefile` reads
it; nothing here computes a number).

    python -m reslab.report.evidence --readme          # rewrite README.md's section from docs/evidence
    python -m reslab.report.evidence --readme --check  # exit 1 when README.md's section is out of date

The README's section lies between :data:`BEGIN` and :data:`END`; until a run is recorded it says
that the study has not run and what runs it, with no number.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reslab.errors import UsageError
from reslab.files import atomic_write_text
from reslab.study.evidencefile import RUNS_FILE, SUMMARY_FILE, read_summary

BEGIN = "<!-- evidence:begin (generated from docs/evidence/summary.json: python -m reslab.report.evidence --readme) -->"
END = "<!-- evidence:end -->"
STUDY_FILE = "study.md"


def _num(x: float | None, digits: int = 2, sign: bool = True) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def difference(row: dict[str, Any]) -> str:
    """``-0.06 [-1.47, +1.36]`` (pp), or what is missing."""
    if row["diff_pp"] is None:
        return "n/a"
    iv = row["interval_pp"]
    return f"{_num(row['diff_pp'])} [{_num(iv[0])}, {_num(iv[1])}]" if iv else f"{_num(row['diff_pp'])} (no interval)"


def verdict(row: dict[str, Any]) -> str:
    v = row["verdict"]
    if v == "undecided":
        return (
            "not trained yet" if row["epochs"] is None or not row["trained"] else f"undecided at {row['trained']} seeds"
        )
    return f"**{v}**"


def _scope(study: dict[str, Any]) -> str:
    techs = [t for t in study["techniques"] if t != "baseline"]
    train = study["train"]
    return (
        f"{', '.join(study['models'])} x {', '.join(techs)} against baseline; width {train.get('width', 1.0):g}, "
        f"all of {train.get('dataset', 'the dataset')} (batch {train.get('batch_size')}); looks at "
        f"{', '.join(str(n) for n in study['plan']['looks'])} paired seeds; {study['error_rate']}-wide error rate "
        f"{study['alpha']:g}, margin {study['margin_pp']:g} pp"
    )


def _regime(summary: dict[str, Any]) -> list[str]:
    out = []
    for m in summary["models"]:
        seeds = max((r["trained"] for r in summary["rows"] if r["model"] == m["model"]), default=0)
        out.append(f"- {m['model']}: {m['plateau']['sentence']}; up to {seeds} paired seeds so far")
    return out


def _table(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | technique | epochs | seeds | test accuracy minus baseline's, pp [interval] | verdict "
        "| baseline test acc. % | cards |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['technique']} | {r['epochs'] if r['epochs'] is not None else '-'} | {r['seeds']} "
            f"| {difference(r)} | {verdict(r)} | {_num(r['baseline_acc'], sign=False)} "
            f"| {', '.join(r['devices']) or '-'}{' (kept apart)' if r.get('apart') else ''} |"
        )
    return lines


#: the width the generated prose is wrapped at (tables are left as they are)
WIDTH = 100


def wrap(lines: Sequence[str]) -> str:
    """Paragraphs and list items wrapped at :data:`WIDTH`; table rows, headings and blanks as they are."""
    out = []
    for line in lines:
        if not line or line.startswith(("|", "#")):
            out.append(line)
        elif line.startswith("- "):
            out.append(
                textwrap.fill(line, WIDTH, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)
            )
        else:
            out.append(textwrap.fill(line, WIDTH, break_long_words=False, break_on_hyphens=False))
    return "\n".join(out)


def readme_section(summary: dict[str, Any], link: str = "docs/evidence/study.md") -> str:
    """The lines between README.md's markers (without them), from summary.json's content."""
    study = summary["study"]
    if summary["study_runs"] == 0:
        return wrap(
            [
                "**Not measured yet.** The evidence study has not run: no GPU has trained any of its runs, so this "
                "section shows no result. It asks the article's question properly: "
                + _scope(study)
                + "; each model trained for as many epochs as baseline needs to level off (measured first, at "
                + ", ".join(str(e) for e in study["ladder"])
                + " epochs). `reslab evidence` runs it on a GPU, one call of at most `--budget` (default 8 minutes, "
                "start-up included) at a time, on any card; every call adds its finished runs to "
                f"[docs/evidence/]({link}) and the next continues the same study (`reslab evidence --plan` says "
                "what it would train). `bash benchmarks/gpu.sh` includes one call. The earlier, thinner evidence "
                "(resnet56, 5 epochs, 3 seeds, one H200) is in [docs/evidence/README.md](docs/evidence/README.md).",
            ]
        )
    rows = summary["rows"]
    devices = ", ".join(summary["devices"]) or "none"
    lines = [
        f"The evidence study ([all of it]({link}), `reslab evidence`): {_scope(study)}. "
        f"{summary['decided']} of {len(rows)} rows decided so far, from {summary['study_runs']} runs on {devices}"
        f" (last recorded {summary['updated'] or 'n/a'}). How long each model trained:",
        "",
        *_regime(summary),
        "",
        *_table(rows),
    ]
    apart = [c for m in summary["models"] for c in m["cards"] if c["verdict"] in ("apart", "untested")]
    if apart:
        lines += ["", "Cards kept apart (their rows are separate): " + "; ".join(c["words"] for c in apart) + "."]
    return wrap(lines)


def update_readme(readme: Path, summary: dict[str, Any]) -> bool:
    """Replace the section between the markers of ``readme``; True when its text changed."""
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise UsageError(f"{readme} has no evidence markers ({BEGIN} ... {END}); add them where the section goes")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{readme_section(summary)}\n{END}{tail}"
    if new == text:
        return False
    atomic_write_text(readme, new)
    return True


def readme_text(readme: Path) -> str:
    """The section as README.md holds it now (between the markers)."""
    text = readme.read_text(encoding="utf-8")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def study_markdown(summary: dict[str, Any]) -> str:
    """study.md: the question, the settings, the plateau, the cards and the decision table with each row's reason."""
    study = summary["study"]
    train = ", ".join(f"{k}={v}" for k, v in study["train"].items())
    lines = [
        "# The evidence study",
        "",
        f"Written by `reslab evidence` from `{RUNS_FILE}` (one record per run) beside `{SUMMARY_FILE}`; regenerate it "
        "with `reslab evidence --no-train`, never by hand.",
        "",
        f"**The question.** {_scope(study)}.",
        "",
        f"**Settings.** {train}; epochs per model below, chosen from {', '.join(map(str, study['ladder']))} as the "
        "shortest after which doubling the training gains less than the margin in baseline's mean validation "
        f"accuracy ({study['plateau_seeds']} seeds per length, measured on one card); seeds added "
        f"{study['plan']['step']} at a time up to {study['plan']['max_seeds']}; runs of different cards pooled per "
        "model only where baseline agrees "
        f"(Welch's test at {study['pooling']['alpha']:g} with at least {study['pooling']['min_runs']} runs a card, "
        f"and a difference below the margin).",
        "",
        f"**Recorded.** {summary['runs']} runs ({summary['study_runs']} of these settings"
        + (f", {summary['other_settings']} of other settings, not read" if summary["other_settings"] else "")
        + (f", {summary['duplicates']} duplicates left out" if summary["duplicates"] else "")
        + f"), on {', '.join(summary['devices']) or 'no card yet'}; last recorded {summary['updated'] or 'n/a'}. "
        f"{summary['decided']} of {len(summary['rows'])} rows decided.",
        "",
        "## How long each model trained",
        "",
        "| model | epochs | how chosen | baseline's mean validation accuracy per length (runs) |",
        "|---|---|---|---|",
    ]
    for m in summary["models"]:
        pts = ", ".join(
            f"{p['epochs']}: {_num(p['val_acc'], sign=False)}% ({p['runs']})"
            for p in m["plateau"]["points"]
            if p["runs"]
        )
        lines.append(
            f"| {m['model']} | {m['epochs'] if m['epochs'] is not None else '-'} | {m['plateau']['sentence']} "
            f"| {pts or '-'} |"
        )
    lines += ["", "## Cards", ""]
    for m in summary["models"]:
        if m["cards"]:
            lines.append(f"- {m['model']}: " + "; ".join(f"{c['device']}: {c['words']}" for c in m["cards"]))
    if not any(m["cards"] for m in summary["models"]):
        lines.append("No card has trained a run of the study yet.")
    lines += ["", "## Decision table", "", *_table(summary["rows"]), "", "Each row's reason:", ""]
    for r in summary["rows"]:
        where = f" on {', '.join(r['group'])}" if len(r["group"]) else ""
        lines.append(f"- {r['model']} {r['technique']}{where}: {r['reason']}")
    lines += [
        "",
        "The difference is technique minus baseline in test accuracy at the end of training, paired by seed, over the "
        "seeds where both runs finished; the rule and its measured error rates: docs/decision-rule.md.",
    ]
    return wrap(lines) + "\n"


def write_study_report(out: str | Path) -> Path:
    """``OUT/study.md`` from ``OUT/summary.json``."""
    out = Path(out)
    path = out / STUDY_FILE
    atomic_write_text(path, study_markdown(read_summary(out / SUMMARY_FILE)))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reslab.report.evidence", description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", action="store_true", help="rewrite the README's section from summary.json")
    parser.add_argument("--check", action="store_true", help="with --readme: change nothing, exit 1 when it differs")
    parser.add_argument("--out", default="docs/evidence", help="the study's folder (default docs/evidence)")
    parser.add_argument("--file", default="README.md", help="the README to update (default README.md)")
    args = parser.parse_args(argv)
    try:
        summary = read_summary(Path(args.out) / SUMMARY_FILE)
        readme = Path(args.file)
        if not args.readme:
            print(write_study_report(args.out))
            return 0
        if args.check:
            same = readme_text(readme) == readme_section(summary)
            print(f"{readme}: the evidence section is {'up to date' if same else 'out of date'}")
            return 0 if same else 1
        changed = update_readme(readme, summary)
        print(f"{readme}: {'updated' if changed else 'already up to date'}")
        return 0
    except (UsageError, OSError) as e:
        print(f"python -m reslab.report.evidence: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
