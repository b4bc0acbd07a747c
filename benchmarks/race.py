"""Two `reslab train` on one --out, started 0.3 s apart, N times, idle and beside a busy loop: how
often exactly one trains and the other is refused (exit 2, naming the holder) with the first's run
complete. The hostile-input suite (tests/cli/test_hostile.py) runs it twice; this runs it as often
as asked:

    python benchmarks/race.py 20
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "cli"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_hostile import race_argv  # the suite's own command line


def once(root: Path) -> bool:
    out = root / "run"
    first = subprocess.Popen(race_argv(out, "baseline", 0), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    second = subprocess.Popen(race_argv(out, "scale", 1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    res = [(p.wait(), p.communicate()[1]) for p in (first, second)]
    codes = sorted(r[0] for r in res)
    loser = [e for c, e in res if c == 2]
    winner = ("baseline", "scale")[0 if res[0][0] == 0 else 1]
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        codes == [0, 2]
        and len(loser) == 1
        and "being trained right now by process" in loser[0]
        and len(loser[0].strip().splitlines()) == 1
        and summary.get("status") == "completed"
        and summary.get("technique") == winner
    )


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    for busy in (False, True):
        loop = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
        try:
            good = 0
            for _ in range(n):
                with tempfile.TemporaryDirectory() as tmp:
                    good += once(Path(tmp))
        finally:
            if loop is not None:
                loop.kill()
        print(f"{'beside a busy loop' if busy else 'idle'}: {good} of {n} races ended with one run and one refusal")


if __name__ == "__main__":
    main()
