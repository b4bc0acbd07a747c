"""A report as a reader first sees it: report.html rendered by headless Chromium at a window size
(1400 x 900 by default), measured for what lies on the first screen, and optionally photographed.

Used by the browser test (tests/report/test_answer.py) and to make the example report's
first-screen.png::

    python -m reslab.report.browser docs/example-report/report.html docs/example-report/first-screen.png

Chromium is not a dependency of reslab: :func:`find_browser` returns None where it is missing.
"""

from __future__ import annotations

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
  // one line per element: id top bottom head_bottom natural_width line_height cell_height...
  // (-1 where an element has no such thing); then "viewport width height"
  const lines = [];
  for (const id of [%s]) {
    const el = document.getElementById(id);
    if (!el) continue;
    const r = el.getBoundingClientRect();
    const head = el.querySelector("thead");
    const img = el.querySelector("img");
    const lh = parseFloat(getComputedStyle(el.querySelector("td") || el).lineHeight) || -1;
    const cells = Array.from(el.querySelectorAll("tbody td")).map((c) => c.getBoundingClientRect().height);
    lines.push([id, r.top, r.bottom, (head ? head.getBoundingClientRect() : r).bottom,
                img ? img.naturalWidth : -1, lh, ...cells].join(" "));
  }
  lines.push(["viewport", window.innerWidth, window.innerHeight].join(" "));
  const pre = document.createElement("pre");
  pre.id = "reslab-layout";
  pre.textContent = lines.join("\\n");
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
        ids = ", ".join(f'"{m}"' for m in MEASURED)
        probe.write_text(page.replace("</body>", _MEASURE % ids + "</body>"), encoding="utf-8")
        args = [f"--window-size={screen[0]},{screen[1]}", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
        dom = _run(browser, args).stdout
    start = dom.index('<pre id="reslab-layout">') + len('<pre id="reslab-layout">')
    out: dict[str, Box] = {}
    for line in dom[start : dom.index("</pre>", start)].splitlines():
        name, *nums = line.split()
        v = [float(n) for n in nums]
        if name == "viewport":
            out["viewport"] = Box(0.0, v[1], v[1], int(v[0]), (), None)
        elif name in MEASURED:
            width = int(v[3]) if v[3] >= 0 else None
            out[name] = Box(v[0], v[1], v[2], width, tuple(v[5:]), v[4] if v[4] >= 0 else None)
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
