"""The report's user-facing details (issue 18, item 6): a corrupt run file is an error that names
the file and the fix, the title and settings say what was compared, intervals never show
impossible bounds, and report.html renders in a real browser (headless Chromium). Synthetic
results folders (tests/synthetic.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from patience import HANG_S
from reslab.cli import main
from reslab.study.gridfile import write_grid_file
from synthetic import write_grid, write_run


def small_grid(root: Path, seeds: int = 3) -> None:
    write_grid(root, ["baseline", "scale"], seeds=range(seeds))
    for s in range(seeds):
        write_run(root, "baseline", s, [0.5, 0.80 + 0.01 * s])
        write_run(root, "scale", s, [0.5, 0.81 + 0.01 * s])


@pytest.mark.parametrize("content", ['{"status": "compl', "[1, 2]", ""])
def test_a_corrupt_summary_is_an_error_naming_the_file_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    root = tmp_path / "compare"
    small_grid(root)
    assert main(["report", str(root)]) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in root.iterdir() if p.is_file()}
    bad = root / "runs" / "resnet8-scale-s1" / "summary.json"
    bad.write_text(content)
    assert main(["report", str(root)]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert (
        str(bad) in lines[0] and "re-run the same compare command" in lines[0] and "delete the run folder" in lines[0]
    )
    # nothing of the report already there was replaced
    assert {p: p.read_bytes() for p in root.iterdir() if p.is_file()} == before


def test_the_scheduler_still_reads_an_unreadable_summary_as_unknown(tmp_path: Path) -> None:
    from reslab.study.results import read_run

    root = tmp_path / "compare"
    small_grid(root)
    run = root / "runs" / "resnet8-scale-s1"
    (run / "summary.json").write_text("{")
    assert read_run(run) is not None and read_run(run).status == "interrupted"


PROBE = """<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "rendered";
  out.textContent = document.body.innerText;
  document.querySelectorAll("img").forEach((i) => i.setAttribute("data-natural-width", String(i.naturalWidth)));
  document.body.appendChild(out);
});
</script>"""


def test_report_html_renders_in_a_real_browser(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Chromium (headless) renders report.html: no Markdown markup in the text a reader sees, the
    tables are tables and the figures are images that decode."""
    import html.parser
    import shutil
    import subprocess

    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no chromium binary installed (CI installs Debian's chromium: see README.md's test command)")
    root = tmp_path / "compare"
    small_grid(root)
    assert main(["report", str(root)]) == 0
    capsys.readouterr()
    page = (root / "report.html").read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=HANG_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]

    class Dom(html.parser.HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.tags: dict[str, int] = {}
            self.widths: list[int] = []
            self.rendered: list[str] = []
            self._in_rendered = False

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.tags[tag] = self.tags.get(tag, 0) + 1
            a = dict(attrs)
            if tag == "img":
                self.widths.append(int(a.get("data-natural-width") or 0))
            self._in_rendered = self._in_rendered or (tag == "pre" and a.get("id") == "rendered")

        def handle_endtag(self, tag: str) -> None:
            if tag == "pre":
                self._in_rendered = False

        def handle_data(self, data: str) -> None:
            if self._in_rendered:
                self.rendered.append(data)

    dom = Dom()
    dom.feed(done.stdout)
    text = "".join(dom.rendered)
    assert "reslab comparison" in text and "scale" in text, done.stdout[:2000]
    for markup in ("**", "|---|", "| --- |", "![", "](", "\n# ", "\n## "):
        assert markup not in text, f"raw Markdown {markup!r} in the rendered page"
    md_tables = sum(
        1
        for line in (root / "report.md").read_text().splitlines()
        if line.startswith("|---") or line.startswith("| ---")
    )
    assert md_tables >= 1 and dom.tags.get("table", 0) == md_tables
    figures = sorted((root / "figures").glob("*.png"))
    assert figures and len(dom.widths) == len(figures) and all(w > 0 for w in dom.widths), dom.widths


def test_the_title_and_settings_say_what_was_compared(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import yaml

    root = tmp_path / "compare"  # the folder's name says nothing about the grid
    small_grid(root)
    grid = json.loads((root / "grid.json").read_text())
    grid["train"]["val_size"] = None  # left to the default by the grid
    grid["target_acc"] = "auto"
    write_grid_file(root, grid)
    for run in (root / "runs").iterdir():
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "val_size": 5000}))
    assert main(["report", str(root)]) == 0
    capsys.readouterr()
    md = (root / "report.md").read_text()
    assert md.splitlines()[0] == "# reslab comparison: custom grid, resnet8"
    assert "val_size=None" not in md and "val_size=5000" in md
    # baseline's final validation accuracies are 0.80, 0.81, 0.82: 95% of their mean is 77.0%
    assert "auto, 95% of baseline's mean validation accuracy at the end of training = resnet8 77.0%" in md
    assert "<title>reslab comparison: custom grid, resnet8</title>" in (root / "report.html").read_text()

    grid["preset"] = "quick"
    grid["target_acc"] = 0.7
    write_grid_file(root, grid)
    assert main(["report", str(root)]) == 0
    md = (root / "report.md").read_text()
    assert md.splitlines()[0] == "# reslab comparison: quick preset, resnet8"
    assert "Target validation accuracy (for epochs to target): resnet8 70.0%." in md


def test_compare_help_and_default_target_agree_with_the_report(capsys: pytest.CaptureFixture[str]) -> None:
    from reslab.cli import build_parser
    from reslab.cli.commands.compare import build_grid

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    auto = "'auto' (the default): per model, 95% of baseline's mean validation accuracy at the end of training"
    assert auto in help_text
    args = build_parser(["compare"]).parse_args(["compare", "--models", "resnet8", "--seeds", "2", "--out", "x"])
    assert build_grid(args)[0].target_acc == "auto"


@pytest.mark.parametrize(
    ("baseline", "shown", "hidden"),
    [
        # 2 seeds, far apart: the t interval (mean ± 12.7 x sd/sqrt 2) spans far more than 0-100%
        ([0.2, 0.5], "too few seeds for an interval", ["[-", "-155", "225"]),
        # 2 seeds near the top: the upper bound (about 110.7%) is clipped at 100%, with a note
        ([0.97, 0.99], "100.00]% (clipped at 100%: too few seeds", ["110.", "[85.29, 110"]),
    ],
)
def test_an_accuracy_interval_never_shows_impossible_bounds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], baseline: list[float], shown: str, hidden: list[str]
) -> None:
    root = tmp_path / "compare"
    write_grid(root, ["baseline", "scale"], seeds=range(2))
    for s, acc in enumerate(baseline):
        write_run(root, "baseline", s, [0.1, acc])
        write_run(root, "scale", s, [0.1, acc + 0.001])
    assert main(["report", str(root)]) == 0
    capsys.readouterr()
    md = (root / "report.md").read_text()
    text = next(line for line in md.splitlines() if line.startswith("| baseline |"))  # its own accuracy
    assert shown.replace("]%", "]") in text.replace("]%", "]"), text
    assert not any(h in text for h in hidden), text
