"""The report's document model: one list of blocks (headings, paragraphs, tables, figures)
rendered both to Markdown and to a self-contained HTML page."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Doc:
    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def ul(self, items: Iterable[str]) -> None:
        items = list(items)
        if items:
            self.blocks.append(("ul", items))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]], anchor: str | None = None) -> None:
        """A table; ``anchor``: its HTML id (a reader's link, and what the browser test finds)."""
        self.blocks.append(("table", (list(header), [list(r) for r in rows], anchor)))

    def img(self, path: Path, rel: str, alt: str, anchor: str | None = None) -> None:
        """A figure stored at ``path``, linked as ``rel`` from the Markdown and embedded in the HTML."""
        self.blocks.append(("img", (path, rel, alt, anchor)))

    def markdown(self) -> str:
        out: list[str] = []
        for kind, v in self.blocks:
            if kind == "h":
                out.append("#" * v[0] + " " + v[1])
            elif kind == "p":
                out.append(v)
            elif kind == "ul":
                out.append("\n".join(f"- {i}" for i in v))
            elif kind == "table":
                header, rows, _ = v
                lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
                lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
                out.append("\n".join(lines))
            elif kind == "img":
                out.append(f"![{v[2]}]({v[1]})")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        def e(text: str) -> str:  # escaped, with markdown's **bold** (the decision labels) as <strong>
            return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(text))

        body: list[str] = []
        for kind, v in self.blocks:
            if kind == "h":
                body.append(f"<h{v[0]}>{e(v[1])}</h{v[0]}>")
            elif kind == "p":
                body.append(f"<p>{e(v)}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in v) + "</ul>")
            elif kind == "table":
                header, rows, anchor = v
                head = "".join(f"<th>{e(c)}</th>" for c in header)
                trs = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
                body.append(f"<table{_id(anchor)}><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
            elif kind == "img":
                data = base64.b64encode(Path(v[0]).read_bytes()).decode("ascii")
                body.append(
                    f'<figure{_id(v[3])}><img alt="{html.escape(v[2])}" src="data:image/png;base64,{data}"></figure>'
                )
        style = (
            "body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}"
            "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
            "th,td{border:1px solid #bbb;padding:3px 8px;text-align:left}th{background:#eee}"
            "img{max-width:100%}figure{margin:1em 0}"
            "@media print{body{max-width:none}figure{break-inside:avoid}}"
        )
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
        )


def _id(anchor: str | None) -> str:
    return f' id="{html.escape(anchor)}"' if anchor else ""
