"""A run's checkpoints: one per epoch (weights as safetensors, optimizer state and records
through ``torch.save`` of plain containers, read back with ``weights_only=True``), each pair with
its own record of SHA-256 checksums (``epoch-N.json``), the last two kept; resuming from the
newest intact one. ``checkpoint/latest.json`` names the newest for readers of reslab 0.2."""

from __future__ import annotations

import contextlib
import hashlib
import io
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.engine import runs
from reslab.engine.config import RESUMABLE_CHANGES, TrainConfig
from reslab.engine.state import Engine, RunState
from reslab.errors import UsageError
from reslab.files import atomic_write, load_state, torch_load_safe
from reslab.nn.weights import load_into, read_metadata, save_weights, spec_from_metadata


def check_resume_config(saved: dict[str, Any], cfg: TrainConfig, out: Path) -> None:
    may_change = RESUMABLE_CHANGES | ({"epochs"} if runs.extendable(saved) else set())
    if saved.get("model") != cfg.model or saved.get("technique") != cfg.technique:
        raise UsageError(
            f"the checkpoint in {out} is for model {saved.get('model')} with technique {saved.get('technique')}, "
            f"not {cfg.model} with {cfg.technique}; resume with the same model and technique or use a new --out"
        )
    now = cfg.to_dict()
    for k, v in saved.items():
        if k in may_change or k not in now:
            continue
        if now[k] != v and k == "epochs":
            raise UsageError(
                f"--resume with epochs={now[k]}, but the run in {out} was started with epochs={v} on a "
                f"{saved.get('schedule')} schedule, whose learning rate depends on the total; resume with "
                f"--epochs {v}, or start a new run in another --out (runs with --schedule constant --warmup 0 "
                "can change their epochs)"
            )
        if now[k] != v:
            raise UsageError(
                f"--resume with {k}={now[k]!r}, but the run in {out} was started with {k}={v!r}; "
                "a resumed run must keep its settings (start a new run in another --out to change them)"
            )


def read_checkpoint(out: Path, cfg: TrainConfig) -> dict[str, Any]:
    """The newest intact checkpoint of the run to resume (its files present, their checksums
    matching, both readable), once its config and weights are known to be the ones ``cfg``
    continues; else a :class:`UsageError`. A damaged newest checkpoint falls back to the one
    before it, with a line on stderr saying so."""
    damaged: list[str] = []
    for info in _candidates(out):
        read = _read_intact(out / "checkpoint", info)
        if not isinstance(read, str):
            if damaged:
                print(
                    f"reslab: {'; '.join(damaged)}; resuming from the checkpoint of epoch {info['epoch']}",
                    file=sys.stderr,
                )
            return _check_compatible(out, cfg, info, *read)
        damaged.append(f"checkpoint of epoch {info.get('epoch', '?')} in {out / 'checkpoint'} is damaged ({read})")
    what = "; ".join(damaged) if damaged else f"no checkpoint is listed in {out / 'checkpoint'}"
    raise UsageError(f"cannot resume {out}: {what}; pass --overwrite to restart this run from its first epoch")


def _candidates(out: Path) -> list[dict[str, Any]]:
    """The checkpoints a run folder lists, newest first: each pair's own record (epoch-N.json,
    with checksums), else latest.json alone (runs of reslab 0.2, without checksums)."""
    ck = out / "checkpoint"
    found: dict[int, dict[str, Any]] = {}
    for p in ck.glob("epoch-*.json") if ck.is_dir() else []:
        _add_record(found, runs.read_json(p))
    if not found:
        _add_record(found, runs.read_json(ck / "latest.json"))
    return [found[e] for e in sorted(found, reverse=True)]


def _add_record(found: dict[int, dict[str, Any]], info: Any) -> None:
    with contextlib.suppress(KeyError, TypeError, ValueError):
        found[int(info["epoch"])] = info


def _read_intact(ck: Path, info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | str:
    """A checkpoint's weights metadata and state, read once; or why it cannot be resumed from."""
    if not isinstance(info.get("weights"), str) or not isinstance(info.get("state"), str):
        return "its record names no files"
    sums = info.get("sha256") or {}
    for key in ("weights", "state"):
        path = ck / info[key]
        if not path.is_file():
            return f"{path.name} is missing"
        if key in sums and file_sha256(path) != sums[key]:
            return f"{path.name} does not match its checksum"
    try:
        return read_metadata(ck / info["weights"]), torch_load_safe(ck / info["state"])
    except Exception as e:  # noqa: BLE001 - any failure to read it back is damage here; nothing is unpickled
        return str(e).split(";")[0][:200]


def _check_compatible(
    out: Path, cfg: TrainConfig, info: dict[str, Any], meta: dict[str, Any], state: dict[str, Any]
) -> dict[str, Any]:
    """``info`` once its saved config (in ``state``) and weights (``meta``) are the run ``cfg`` continues."""
    check_resume_config(state["config"], cfg, out)
    spec = spec_from_metadata(meta, out / "checkpoint" / info["weights"])
    if spec.name != cfg.model or spec.technique != cfg.technique:
        raise UsageError(
            f"the checkpoint weights in {out} are for model {spec.name} with technique {spec.technique}, "
            f"not {cfg.model} with {cfg.technique}"
        )
    return info


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def restore(
    out: Path, ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> RunState:
    """Load the checkpoint's weights and optimizer state; return its run state."""
    st = torch_load_safe(out / "checkpoint" / ckpt["state"])
    load_into(model, load_state(out / "checkpoint" / ckpt["weights"], device), out / "checkpoint")
    try:
        optimizer.load_state_dict(st["optimizer"])
    except (ValueError, KeyError) as e:
        raise UsageError(f"the optimizer state in {out}/checkpoint does not fit the model ({e})") from None
    return RunState(
        start_epoch=int(st["epoch"]) + 1,
        step=int(st["step"]),
        elapsed=float(st["elapsed_s"]),
        best_acc=float(st["best_val_acc"]),
        best_epoch=int(st["best_epoch"]),
        metrics=list(st["metrics"]),
        evals=list(st.get("evals", [])),
    )


def checkpoint_epoch(out: Path) -> int:
    """The epoch ``out``'s newest listed checkpoint stands at (0 when there is none: such a run
    starts again)."""
    listed = _candidates(out)
    return int(listed[0]["epoch"]) if listed else 0


def save_checkpoint(out: Path, e: Engine, state: RunState, epoch: int) -> None:
    """Write epoch ``epoch``'s weights and state under new names, then point latest.json
    at them, then remove older ones: a kill at any moment leaves latest.json naming a
    complete pair."""
    ck = out / "checkpoint"
    weights, st = f"epoch-{epoch:04d}.safetensors", f"epoch-{epoch:04d}.pt"
    save_weights(ck / weights, e.raw_model, extra={"epoch": epoch})
    payload = {
        "optimizer": e.optimizer.state_dict(),
        "epoch": epoch,
        "step": state.step,
        "elapsed_s": state.elapsed,
        "best_val_acc": state.best_acc,
        "best_epoch": state.best_epoch,
        "metrics": state.metrics,
        "evals": state.evals,
        "config": e.cfg.to_dict(),
    }
    buf = io.BytesIO()  # libtorch's file writer aborts on a failed write; Python's raises
    torch.save(payload, buf)
    data = buf.getvalue()
    atomic_write(ck / st, lambda p: p.write_bytes(data))
    info = {
        "epoch": epoch,
        "weights": weights,
        "state": st,
        "sha256": {"weights": file_sha256(ck / weights), "state": hashlib.sha256(data).hexdigest()},
    }
    runs.write_json(ck / f"epoch-{epoch:04d}.json", info)  # the pair's own record, written last
    runs.write_json(ck / "latest.json", info)
    # keep this checkpoint and the one before it: a damaged newest one still leaves a way back
    keep = {f"epoch-{k:04d}{ext}" for k in (epoch, _previous(ck, epoch)) for ext in (".safetensors", ".pt", ".json")}
    for p in ck.iterdir():
        if p.name.startswith("epoch-") and p.name not in keep:
            p.unlink(missing_ok=True)


def _previous(ck: Path, epoch: int) -> int:
    """The newest epoch below ``epoch`` with a complete record (-1 when there is none)."""
    below = []
    for p in ck.glob("epoch-*.json"):
        with contextlib.suppress(ValueError):
            k = int(p.stem.split("-")[1])
            if k < epoch:
                below.append(k)
    return max(below, default=-1)
