"""Where the noise of a paired comparison comes from: train one regime's grid and keep every test
image's outcome, so that the spread of technique - baseline (same seed) can be read for the whole
test set, a 2,000-image part of it, test loss, and accuracy at each validation.

Train a regime (each run alone in a process, ``--jobs`` at once, one thread each)::

    python benchmarks/noise.py train --out /tmp/noise/A --seeds 4 --jobs 2 \\
        --set train_subset=4000 --set epochs=1 --set batch_size=16 --set lr=0.0125

Then read one or more regimes (a markdown table, one row per regime x model x technique)::

    python benchmarks/noise.py table /tmp/noise/A /tmp/noise/B

Each run folder gets ``test.npz``: per test image whether the final model was right and its loss.
The paired sd over seeds is what an interval of the difference is built from: half-width about
``t * sd / sqrt(n)``. Nothing here is part of reslab; it is how the quick preset was sized
(benchmarks/README.md, "Where the noise comes from").
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

MODELS = ("resnet8", "resnet56")
TECHNIQUES = ("baseline", "scale", "norm", "fusion")
#: the fixed part of the test set a small test would use (the same for every run)
SUBSET = 2000
SUBSET_SEED = 12_2026


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _settings(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in pairs:
        k, _, v = p.partition("=")
        out[k.strip()] = _value(v.strip())
    return out


def _train_one(job: tuple[dict[str, Any], str]) -> tuple[str, float]:
    import torch

    from reslab.deploy.sources import load_source
    from reslab.engine.build import open_run_dataset
    from reslab.engine.config import TrainConfig
    from reslab.engine.train import train
    from reslab.nn.normalize import Normalize

    values, folder = job
    out = Path(folder)
    if (out / "test.npz").exists():
        return folder, 0.0
    cfg = TrainConfig.from_dict({**values, "threads": 1}, source=folder)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    summary = train(cfg, out, overwrite=True, progress=False)
    wall = time.perf_counter() - t0
    correct = np.zeros(0, bool)
    loss = np.zeros(0, np.float32)
    if summary.get("status") == "completed":
        model, meta = load_source(out)
        ds = open_run_dataset(cfg)
        norm = Normalize.from_metadata(meta, ds.input_size[0])
        outs, losses = [], []
        with torch.inference_mode():
            for lo in range(0, len(ds.test_x), 1000):
                x, y = ds.test_x[lo : lo + 1000], ds.test_y[lo : lo + 1000]
                logits = model(norm.from_uint8(x))
                outs.append((logits.argmax(1) == y).numpy())
                losses.append(torch.nn.functional.cross_entropy(logits, y, reduction="none").numpy())
        correct, loss = np.concatenate(outs), np.concatenate(losses).astype(np.float32)
    np.savez_compressed(out / "test.npz", correct=correct, loss=loss, train_s=np.float64(wall))
    return folder, wall


def cmd_train(args: argparse.Namespace) -> int:
    settings = _settings(args.set)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    (root / "regime.json").write_text(json.dumps({"settings": settings, "seeds": args.seeds}, indent=2) + "\n")
    jobs = []
    # seed-major and deep models first: the longest runs start early, a cut-short study stays paired
    for seed in range(args.seeds):
        for model in sorted(args.models.split(","), key=lambda m: -int(m.removeprefix("resnet"))):
            for tech in args.techniques.split(","):
                values = {**settings, "model": model, "technique": tech, "seed": seed}
                jobs.append((values, str(root / f"{model}-{tech}-s{seed}")))
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.jobs, maxtasksperchild=1) as pool:
        for k, (folder, wall) in enumerate(pool.imap_unordered(_train_one, jobs), 1):
            el = time.perf_counter() - t0
            print(f"[{k}/{len(jobs)}] {Path(folder).name} {wall:.1f}s (elapsed {el:.0f}s)", file=sys.stderr)
    print(f"{len(jobs)} runs in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return 0


def _load(root: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    subset = np.random.default_rng(SUBSET_SEED).choice(10_000, SUBSET, replace=False)
    runs: dict[tuple[str, str, int], dict[str, Any]] = {}
    for f in sorted(root.glob("*/test.npz")):
        model, tech, seed = f.parent.name.rsplit("-", 2)
        z = np.load(f)
        summ = json.loads((f.parent / "summary.json").read_text())
        evals = []
        if (f.parent / "evals.jsonl").exists():
            evals = [json.loads(line) for line in (f.parent / "evals.jsonl").read_text().splitlines() if line]
        ok = z["correct"]
        runs[(model, tech, int(seed[1:]))] = {
            "status": summ.get("status"),
            "acc": float(ok.mean()) if len(ok) else math.nan,
            "acc2k": float(ok[subset].mean()) if len(ok) else math.nan,
            "loss": float(z["loss"].mean()) if len(ok) else math.nan,
            "val": [float(e["val_acc"]) for e in evals],
            "train_s": float(z["train_s"]),
            "steps": summ.get("steps"),
        }
    return runs


def _paired(runs: dict, model: str, tech: str, key: str, chance: float = 0.1) -> tuple[float, float, int]:
    seeds = sorted(s for (m, t, s) in runs if m == model and t == tech and (m, "baseline", s) in runs)
    d = []
    for s in seeds:
        a, b = runs[(model, tech, s)][key], runs[(model, "baseline", s)][key]
        if math.isfinite(a) and math.isfinite(b):
            d.append(a - b)
    if len(d) < 2:
        return math.nan, math.nan, len(d)
    return float(np.mean(d)), float(np.std(d, ddof=1)), len(d)


def cmd_table(args: argparse.Namespace) -> int:
    print(
        "| regime | model | technique | n | baseline acc % (sd) | acc diff pp (paired sd) | sd, 2k test | "
        "test loss diff x100 (sd) | mid-run val diff pp (sd) | s/run |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for folder in args.dirs:
        root = Path(folder)
        runs = _load(root)
        name = root.name
        for model in MODELS:
            base = [r for (m, t, _), r in runs.items() if m == model and t == "baseline"]
            if not base:
                continue
            accs = [100 * r["acc"] for r in base]
            for tech in TECHNIQUES[1:]:
                mean, sd, n = _paired(runs, model, tech, "acc")
                if not n:
                    continue
                _, sd2k, _ = _paired(runs, model, tech, "acc2k")
                ml, sdl, _ = _paired(runs, model, tech, "loss")
                mid = {
                    k: {**r, "mid": r["val"][len(r["val"]) // 2 - 1] if len(r["val"]) >= 2 else math.nan}
                    for k, r in runs.items()
                }
                mm, sdm, _ = _paired(mid, model, tech, "mid")
                fails = sum(
                    1 for (m, t, _), r in runs.items() if m == model and t == tech and r["status"] != "completed"
                )
                secs = np.mean([r["train_s"] for (m, t, _), r in runs.items() if m == model and t == tech])
                print(
                    f"| {name} | {model} | {tech} | {n}{f' ({fails} failed)' if fails else ''} | "
                    f"{np.mean(accs):.1f} ({np.std(accs, ddof=1):.1f}) | {100 * mean:+.2f} ({100 * sd:.2f}) | "
                    f"{100 * sd2k:.2f} | {100 * ml:+.2f} ({100 * sdl:.2f}) | {100 * mm:+.2f} ({100 * sdm:.2f}) | "
                    f"{secs:.1f} |"
                )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train one regime's grid")
    t.add_argument("--out", required=True)
    t.add_argument("--seeds", type=int, default=4)
    t.add_argument("--jobs", type=int, default=2)
    t.add_argument("--models", default=",".join(MODELS))
    t.add_argument("--techniques", default=",".join(TECHNIQUES))
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r = sub.add_parser("table", help="the paired spreads of trained regimes, as markdown")
    r.add_argument("dirs", nargs="+")
    args = p.parse_args(argv)
    return cmd_train(args) if args.cmd == "train" else cmd_table(args)


if __name__ == "__main__":
    sys.exit(main())
