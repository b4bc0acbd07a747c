"""The probe file format (``probe.json``, and a compare's ``probe-init.json``): its one writer
(:func:`write_probe_file`, entries through :func:`entry_to_dict`) and its readers
(:func:`read_probe`, :func:`read_probe_data`), with non-finite numbers as strings so the file
is plain JSON."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from reslab.probe.measure import BlockProbe, ModelProbe, ProbeEntry, Verdict


def _num(x: float) -> float | str | None:
    # JSON has no inf/nan: keep them readable instead of silently turning them into null.
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def entry_to_dict(e: ProbeEntry) -> dict[str, Any]:
    p = e.probe
    return {
        "technique": e.technique,
        "depth": e.depth,
        "num_blocks": p.num_blocks,
        "grad_ratio": _num(p.grad_ratio),
        "grad_first_last": _num(p.grad_first_last),
        "conv1_ratio": _num(p.conv1_ratio),
        "logit_std": _num(p.logit_std),
        "loss": _num(p.loss),
        "finite": p.finite,
        "batches": p.batches,
        "verdict": e.verdict.label,
        "threshold": e.verdict.threshold,
        "reason": e.verdict.reason,
        "seconds": round(e.seconds, 3),
        "blocks": [{k: _num(v) for k, v in asdict(b).items()} for b in p.blocks],
    }


def _float(v: Any) -> float:
    if v is None:
        return math.nan
    if v == "inf":
        return math.inf
    if v == "-inf":
        return -math.inf
    return float(v)


def entry_from_dict(d: dict[str, Any]) -> ProbeEntry:
    """Inverse of :func:`entry_to_dict` (for reading ``probe.json`` back)."""
    blocks = [
        BlockProbe(
            name=b["name"],
            index=int(b["index"]),
            **{k: _float(b[k]) for k in ("out_mean", "out_var", "out_mean_sq", "grad_rms", "param_grad_norm")},
            conv1_grad_norm=_float(b["conv1_grad_norm"]),
        )
        for b in d["blocks"]
    ]
    probe = ModelProbe(
        blocks=blocks,
        logit_std=_float(d["logit_std"]),
        loss=_float(d["loss"]),
        grad_ratio=_float(d["grad_ratio"]),
        grad_first_last=_float(d["grad_first_last"]),
        conv1_ratio=_float(d["conv1_ratio"]),
        finite=bool(d["finite"]),
        batches=int(d.get("batches", 0)),
    )
    v = Verdict(d["verdict"], float(d["threshold"]), d["reason"])
    return ProbeEntry(d["technique"], int(d["depth"]), probe, v, float(d["seconds"]))


def write_probe_file(path: str | os.PathLike[str], config: dict[str, Any], results: Sequence[dict[str, Any]]) -> None:
    """The one writer of probe files (``probe.json`` of ``reslab probe``, ``probe-init.json`` of
    a compare): ``{"config": ..., "results": [entry_to_dict(...) (+ extra keys such as width)]}``.
    Written atomically; no NaN (``allow_nan=False``: a probe's numbers are finite or None)."""
    from reslab.files import atomic_write_text

    atomic_write_text(
        Path(path), json.dumps({"config": config, "results": list(results)}, indent=1, allow_nan=False) + "\n"
    )


def read_probe_data(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A probe file's raw content, ``{}`` when it is missing or unreadable: for readers that
    skip what they cannot use (a report, the check whether a compare must probe again)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_probe(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[ProbeEntry]]:
    """``(config, entries)`` from a ``probe.json`` written by ``reslab probe``."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data["config"], [entry_from_dict(r) for r in data["results"]]
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist; run reslab probe first") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a probe.json written by reslab probe ({e})") from None


def iter_cells(entries: Sequence[ProbeEntry]) -> Iterator[tuple[int, list[ProbeEntry]]]:
    """Entries grouped by depth, in depth order."""
    for d in sorted({e.depth for e in entries}):
        yield d, [e for e in entries if e.depth == d]
