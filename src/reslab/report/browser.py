"""A report as a reader first sees it: report.html rendered by headless Chromium at a window size
(1400 x 900 by default), measured for what lies on the first screen, and optionally photographed.

Used by the browser test (tests/report/test_answer.py) and to make the example report's
first-screen.png::

    python -m reslab.report.browser docs/example-report/report.html docs/example-report/first-screen.png

Chromium is not a dependency of reslab: :func:`find_browser` returns None where it is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

#: what a reader's screen shows before any scrolling (a laptop browser window)
SCREEN = (1400, 900)
#: the elements whose place on the page the measurement reports (their HTML ids)
MEASURED = ("decision-plot", "verdict-table")
#: seconds Chromium may take to render one page
RENDER_TIMEOUT_S = 120

_MEASURE = """
<script>
window.addEventListener("load", () => {
  const out = {};
  for (const id of %s) {
    const el = document.getElementById(id);
    if (!el) continue;
    const r = el.getBoundingClientRect();
    const head = el.querySelector("thead");
    const h = head ? head.getBoundingClientRect() : r;
    const img = el.querySelector("img");
    out[id] = {top: r.top, bottom: r.bottom, left: r.left, right: r.right, head_bottom: h.bottom,
               natural_width: img ? img.naturalWidth : null,
               cell_heights: Array.from(el.querySelectorAll("tbody td")).map((c) => c.getBoundingClientRect().height),
               line_height: parseFloat(getComputedStyle(el.querySelector("td") || el).lineHeight) || null};
  }
  out.viewport = {width: window.innerWidth, height: window.innerHeight};
  const pre = document.createElement("pre");
  pre.id = "reslab-layout";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


@dataclass(frozen=True)
class Box:
    """Where an element lies on the page, in CSS pixels from the top left of the first screen."""

    top: float
    bottom: float
    head_bottom: float  # for a table, the bottom of its header row
    natural_width: int | None  # for a figure, its image's own width
    cell_heights: tuple[float, ...]  # for a table, each body cell's height
    line_height: float | None


def find_browser() -> str | None:
    """The first Chromium-like browser on PATH (None when there is none)."""
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def _run(browser: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    cmd = [browser, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=RENDER_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{browser} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return done


def measure(html: Path, screen: tuple[int, int] = SCREEN, browser: str | None = None) -> dict[str, Box]:
    """Render ``html`` at ``screen`` and return where the decision plot and the verdict table lie
    (keys of :data:`MEASURED` that the page has, and ``viewport``'s size as a Box of its height)."""
    browser = browser or find_browser()
    if browser is None:
        raise RuntimeError("no Chromium found on PATH (install Debian's chromium package)")
    page = html.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "page.html"
        probe.write_text(page.replace("</body>", _MEASURE % json.dumps(list(MEASURED)) + "</body>"), encoding="utf-8")
        args = [f"--window-size={screen[0]},{screen[1]}", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
        dom = _run(browser, args).stdout
    start = dom.index('<pre id="reslab-layout">') + len('<pre id="reslab-layout">')
    raw = json.loads(dom[start : dom.index("</pre>", start)].replace("&quot;", '"').replace("&amp;", "&"))
    out = {
        k: Box(v["top"], v["bottom"], v["head_bottom"], v["natural_width"], tuple(v["cell_heights"]), v["line_height"])
        for k, v in raw.items()
        if k in MEASURED
    }
    vp = raw["viewport"]
    out["viewport"] = Box(0.0, float(vp["height"]), float(vp["height"]), int(vp["width"]), (), None)
    return out


def screenshot(html: Path, png: Path, screen: tuple[int, int] = SCREEN, browser: str | None = None) -> Path:
    """A PNG of the first screen of ``html`` as Chromium shows it at ``screen``."""
    browser = browser or find_browser()
    if browser is None:
        raise RuntimeError("no Chromium found on PATH (install Debian's chromium package)")
    png = png.resolve()
    _run(browser, [f"--window-size={screen[0]},{screen[1]}", f"--screenshot={png}", html.resolve().as_uri()])
    return png


def main(argv: list[str] | None = None) -> int:
    """``python -m reslab.report.browser REPORT.html OUT.png``: photograph the first screen."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m reslab.report.browser REPORT.html OUT.png", file=sys.stderr)
        return 2
    try:
        print(screenshot(Path(args[0]), Path(args[1])))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        print(f"reslab.report.browser: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
