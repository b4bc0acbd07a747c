"""The package keeps its shape: layers that import one way, no cycles (import-linter's
contracts in pyproject.toml), and no module doing several jobs (a length gauge)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from patience import HANG_S

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "reslab"
#: the issue that split the package gauges a module that does one job at about 600 lines
MAX_LINES = 620


def _lint_imports() -> list[str]:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[dev]' brings import-linter")
    return [exe]


def test_import_contracts_hold() -> None:
    proc = subprocess.run([*_lint_imports(), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout and "3 kept" in proc.stdout, proc.stdout[-2000:]


def test_layers_are_subpackages_and_the_top_holds_only_leaves() -> None:
    layers = {"nn", "engine", "study", "report", "deploy", "probe", "cli", "api"}
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()} == layers
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == {
        "__init__",
        "__main__",
        "caches",
        "errors",
        "files",
        "paths",
        "plotting",
        "pool",
        "progress",
        "signals",
        "version",
    }


def test_no_module_is_long_enough_to_hide_several_jobs() -> None:
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"split these by job: {long}"


def test_tests_mirror_the_layers() -> None:
    for layer in ("nn", "engine", "study", "report", "deploy", "probe", "cli"):
        assert list((ROOT / "tests" / layer).glob("test_*.py")), f"tests/{layer}/ has no tests"
