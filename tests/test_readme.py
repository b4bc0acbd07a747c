"""The README's set-up is what CI runs, and the project refers to nothing outside itself."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from patience import HANG_S

ROOT = Path(__file__).resolve().parent.parent
MARK = "# The README's test command, verbatim:"


def _readme_command(label: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(rf"\*\*{label}\*\*.*?```bash\n(.*?)\n```", text, re.S)
    assert m, f"no bash block after **{label}** in README.md"
    lines = [ln for ln in m.group(1).splitlines() if ln.strip()]
    assert len(lines) == 1, "each README command is one line"
    return lines[0]


def _ci_command() -> str:
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    return lines[lines.index(MARK) + 1]


def test_ci_runs_the_readme_test_command_verbatim():
    assert _ci_command() == _readme_command("Tests")


def test_readme_setup_uses_a_virtualenv_and_refreshes_apt():
    for label in ("Main job", "Tests"):
        cmd = _readme_command(label)
        steps = cmd.split(" && ")
        assert steps[0] == "apt-get update"
        assert "python3-venv" in steps[1] and "dataset-fashion-mnist" in steps[1]
        assert steps[2] == "python3 -m venv .venv"
        assert steps[3].startswith(".venv/bin/pip install -e ")
        # nothing installed with the system pip (PEP 668 refuses it on Debian)
        assert "python3 -m pip" not in cmd
    assert _readme_command("Main job").endswith("&& .venv/bin/reslab compare")


def _fake_tools(bin_dir: Path, suite_status: int) -> None:
    """apt-get and python3 stand-ins: the venv's python exits with ``suite_status``."""
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text('#!/bin/sh\necho "apt-get $*" >> "$CI_LOG"\n')
    (bin_dir / "timeout").write_text('#!/bin/sh\nshift\nexec "$@"\n')
    venv_python = f'#!/bin/sh\necho "python $*" >> "$CI_LOG"\nexit {suite_status}\n'
    (bin_dir / "python3").write_text(
        "#!/bin/sh\n"
        'echo "python3 $*" >> "$CI_LOG"\n'
        "mkdir -p .venv/bin\n"
        'printf \'#!/bin/sh\\necho "pip $*" >> "$CI_LOG"\\n\' > .venv/bin/pip\n'
        f"cat > .venv/bin/python <<'X'\n{venv_python}X\n"
        "chmod +x .venv/bin/pip .venv/bin/python\n"
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)


@pytest.mark.parametrize("suite_status", [0, 1])
def test_ci_run_exit_status_follows_the_suite(tmp_path, suite_status):
    repo = tmp_path / "clone"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy2(ROOT / ".ci" / "run", repo / ".ci" / "run")
    _fake_tools(tmp_path / "bin", suite_status)
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "CI_LOG": str(log)}
    env.pop("RESLAB_CI_TIMED", None)
    r = subprocess.run([str(repo / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=HANG_S)
    assert (r.returncode != 0) == bool(suite_status), r.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "apt-get update"
    assert calls[-1] == "python -m pytest -q"


def test_nothing_refers_outside_the_repository():
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.splitlines()
    if not tracked:
        pytest.skip("not a git checkout")
    needles = ("../" + "shared", "shared" + "/seed")  # spelled apart so this file passes
    offenders = []
    for name in tracked:
        path = ROOT / name
        if path.suffix in {".png", ".jpg", ".npy", ".safetensors"} or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if any(n in text for n in needles):
            offenders.append(name)
    assert offenders == []
