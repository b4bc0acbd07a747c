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


#: the modules that own a file format reslab writes, each its one reader and writer (and the
#: launcher's reach check, whose remote script answers in one JSON line it parses itself)
JSON_OWNERS = {
    "nn/weights.py": "reslab's metadata beside a model: safetensors, TorchScript, ONNX",
    "engine/runs.py": "a run folder: summary.json, metrics/gradients/evals/starts .jsonl, checkpoint records",
    "probe/records.py": "probe.json and a compare's probe-init.json",
    "study/gridfile.py": "grid.json, failed/*.json, timing.json",
    "study/claims.py": "claims/*.lease and report.stamp",
    "study/evidencefile.py": "the evidence study's runs.jsonl and summary.json",
    "report/derived.py": "a report's results.jsonl and decisions.json",
    "study/launch/reach.py": "the reach check's one-line answer",
}


def _json_calls(path: Path) -> list[str]:
    import ast

    calls = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        f = node.func if isinstance(node, ast.Call) else None
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "json":
            calls.append(f"{f.value.id}.{f.attr}:{node.lineno}")
    return calls


def test_json_is_read_and_written_only_by_the_owner_of_each_file_format() -> None:
    """At most 8 modules outside cli/ call json.*, each the one owner of its format; cli/ only
    prints --json output (json.dumps into print)."""
    src = ROOT / "src" / "reslab"
    touching = {
        p.relative_to(src).as_posix(): calls
        for p in sorted(src.rglob("*.py"))
        if (calls := _json_calls(p)) and "cli" not in p.relative_to(src).parts
    }
    assert set(touching) <= set(JSON_OWNERS), {k: v for k, v in touching.items() if k not in JSON_OWNERS}
    assert len(JSON_OWNERS) <= 8
    for p in sorted((src / "cli").rglob("*.py")):
        text = p.read_text(encoding="utf-8").splitlines()
        for call in _json_calls(p):
            name, line = call.rsplit(":", 1)
            assert name == "json.dumps" and "print(" in text[int(line) - 1], f"{p.name}:{line}: {text[int(line) - 1]}"
