"""A run's checkpoints: one per epoch (weights as safetensors, optimizer state and records
through ``torch.save`` of plain containers, read back with ``weights_only=True``), switched
atomically through ``checkpoint/latest.json``, and resuming from them."""

from __future__ import annotations

import json
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
    """``checkpoint/latest.json`` of the run to resume, once its config and weights are
    known to be the ones ``cfg`` continues; else a :class:`UsageError`."""
    latest = out / "checkpoint" / "latest.json"
    try:
        info = json.loads(latest.read_text())
        if not {"state", "weights"} <= set(info):
            raise KeyError("state")
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{latest} is unreadable; the checkpoint is damaged, start a new run") from None
    saved_cfg = torch_load_safe(out / "checkpoint" / info["state"])["config"]
    check_resume_config(saved_cfg, cfg, out)
    meta = read_metadata(out / "checkpoint" / info["weights"])
    spec = spec_from_metadata(meta, out / "checkpoint" / info["weights"])
    if spec.name != cfg.model or spec.technique != cfg.technique:
        raise UsageError(
            f"the checkpoint weights in {out} are for model {spec.name} with technique {spec.technique}, "
            f"not {cfg.model} with {cfg.technique}"
        )
    return info


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
    """The epoch ``out``'s latest checkpoint stands at, from ``checkpoint/latest.json`` (0 when
    there is none or it is unreadable: such a run starts again)."""
    try:
        return int(json.loads((out / "checkpoint" / "latest.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


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
    atomic_write(ck / st, lambda p: torch.save(payload, str(p)))
    runs.write_json(ck / "latest.json", {"epoch": epoch, "weights": weights, "state": st})
    for p in ck.iterdir():
        if p.name.startswith("epoch-") and p.name not in (weights, st):
            p.unlink(missing_ok=True)
