"""The jobs around the training loop, each a :class:`Callback` told what happened: the run
folder and checkpoints, the gradient-norm probe, TensorBoard, the caller's ``on_epoch`` and
the progress output.

With ``probe_every = K``, ``gradients.jsonl`` gets one JSON object every K optimizer steps,
taken from ``.grad`` right after the backward pass (before the optimizer step; no extra
backward): ``{"step": S, "epoch": E, "<block name>": norm, ...}`` where ``step`` counts
optimizer steps from 1 over the whole run, ``epoch`` is 1-based, and each further key is a
residual block's qualified name (:func:`reslab.nn.blocks.residual_blocks`, forward order)
mapped to the L2 norm of the gradients of all that block's parameters (shortcut projection
and technique parameters included). Under DDP the gradients are the all-reduced ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from reslab.engine import runs
from reslab.engine.checkpoint import save_checkpoint
from reslab.engine.config import config_to_yaml
from reslab.engine.state import Engine, RunState
from reslab.errors import UsageError
from reslab.files import atomic_write_text
from reslab.nn.blocks import residual_blocks
from reslab.nn.weights import save_weights
from reslab.progress import Progress


def block_grad_norms(blocks: list[tuple[str, nn.Module]]) -> list[float]:
    norms = []
    for _, b in blocks:
        grads = [p.grad for p in b.parameters() if p.grad is not None]
        if grads:
            norms.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
        else:
            norms.append(torch.zeros((), device=next(b.parameters()).device))
    return torch.stack(norms).float().cpu().tolist()


class Callback:
    """One job the engine tells about its progress; every method does nothing unless a
    callback overrides it. Called in list order, on the rank(s) the callback exists on."""

    def on_epoch_start(self, epoch: int) -> None:
        """Epoch ``epoch`` (1-based) is about to train."""

    def on_backward(self, step: int, epoch: int) -> None:
        """Step ``step``'s gradients are in ``.grad`` (all-reduced under DDP); the optimizer
        has not stepped yet."""

    def on_batch_end(self, i: int, loss: Tensor, correct: Tensor, seen: int, t0: float) -> None:
        """Batch ``i`` of the epoch stepped; ``loss`` is its loss, ``correct`` and ``seen``
        the epoch's running totals on this rank (device tensors: reading them syncs), ``t0``
        the epoch's start (``time.perf_counter``)."""

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        """An epoch finished and was validated; ``row`` is its metrics.jsonl record."""

    def on_run_end(self, summary: dict[str, Any]) -> None:
        """The run stopped with ``summary["status"]``: completed, diverged, interrupted or failed."""

    def close(self) -> None:
        """Release files and displays, however the run ended."""


def run_end(callbacks: Sequence[Callback], summary: dict[str, Any], **changes: Any) -> None:
    summary.update(changes)
    for cb in callbacks:
        cb.on_run_end(summary)


def default_callbacks(
    e: Engine,
    state: RunState,
    summary: dict[str, Any],
    out: Path,
    fresh: bool,
    progress: bool | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> list[Callback]:
    """The run's callbacks; files are written by rank 0 only. Creating them writes the
    run folder's first files (``fresh``: after removing an old run's)."""
    cbs: list[Callback] = []
    if e.d.main:
        cbs.append(Checkpointing(out, e, state, summary, fresh))
        if e.cfg.probe_every:
            cbs.append(
                GradientNormProbe(out / "gradients.jsonl", residual_blocks(e.raw_model), e.cfg.probe_every, state.step)
            )
        if e.cfg.tensorboard:
            cbs.append(TensorBoardLog(out / "tensorboard", state.start_epoch, e.cfg.epochs))
        if on_epoch is not None:
            cbs.append(EpochHook(on_epoch))
    cbs.append(ProgressReport(progress, e, state))
    return cbs


class Checkpointing(Callback):
    """The run folder: config, records and summary from the start; after each epoch a
    checkpoint, the best-validation weights and the records; at the end the final weights
    and the outcome."""

    def __init__(self, out: Path, e: Engine, state: RunState, summary: dict[str, Any], fresh: bool) -> None:
        self.out, self.e, self.state, self.summary = out, e, state, summary
        if fresh:
            # only now: every check that could refuse the run has passed
            runs.remove_run(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", config_to_yaml(e.cfg))
        self._write_records()

    def _write_records(self) -> None:
        runs.write_jsonl(self.out / "metrics.jsonl", self.state.metrics)
        if self.e.cfg.evals_per_epoch > 1:
            runs.write_jsonl(self.out / "evals.jsonl", self.state.evals)
        runs.write_json(self.out / "summary.json", self.summary)

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        epoch = row["epoch"]
        save_checkpoint(self.out, self.e, self.state, epoch)
        if self.state.best_epoch == epoch:  # the best-validation weights, kept beside the final ones
            best_meta = {**self.e.meta, "epoch": epoch, "val_acc": row["val_acc"]}
            save_weights(self.out / "model-best.safetensors", self.e.raw_model, extra=best_meta)
        self._write_records()

    def on_run_end(self, summary: dict[str, Any]) -> None:
        if summary["status"] == "completed":
            save_weights(self.out / "model.safetensors", self.e.raw_model, extra=self.e.meta)
        runs.write_json(self.out / "summary.json", summary)


class GradientNormProbe(Callback):
    """gradients.jsonl: every ``every`` optimizer steps, each residual block's gradient norm."""

    def __init__(self, path: Path, blocks: list[tuple[str, nn.Module]], every: int, step: int) -> None:
        # keep the records up to the checkpoint's step; later ones will be recomputed
        kept = [r for r in runs.read_jsonl_prefix(path) if r.get("step", 1 << 62) <= step]
        runs.write_jsonl(path, kept)
        self.blocks, self.every = blocks, every
        self.file = open(path, "a", encoding="utf-8")  # closed by close()

    def on_backward(self, step: int, epoch: int) -> None:
        if step % self.every == 0:
            norms = block_grad_norms(self.blocks)
            rec = {"step": step, "epoch": epoch, **{name: v for (name, _), v in zip(self.blocks, norms, strict=True)}}
            self.file.write(runs.jsonl_line(rec))

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardLog(Callback):
    """TensorBoard event files: the epoch's metrics, and the test result at the end."""

    def __init__(self, log_dir: Path, start_epoch: int, epochs: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package: pip install 'reslab[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_epoch)
        self.epochs = epochs

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        for k in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s"):
            self.writer.add_scalar(k, row[k], row["epoch"])
        self.writer.flush()

    def on_run_end(self, summary: dict[str, Any]) -> None:
        if summary["status"] == "completed":
            self.writer.add_scalar("test_acc", summary["test_acc"], self.epochs)
            self.writer.add_scalar("test_loss", summary["test_loss"], self.epochs)

    def close(self) -> None:
        self.writer.close()


class EpochHook(Callback):
    """The caller's ``on_epoch``, given each epoch's metrics row."""

    def __init__(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self.fn = fn

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        self.fn(row)


class ProgressReport(Callback):
    """What the run says on stderr: what it trains, a bar per epoch (on a terminal, or
    with ``progress=True``) and a line per epoch, how it ended."""

    def __init__(self, mode: bool | None, e: Engine, state: RunState) -> None:
        self.prog = Progress("train", enabled=e.d.main and mode is not False, bar=mode)
        self.e, self.state = e, state
        cfg = e.cfg
        if e.pretrained_note:
            self.prog.line(f"initial weights from {cfg.init_weights}: " + e.pretrained_note.replace("\n", "; "))
        self.prog.line(
            f"training {cfg.model} ({cfg.technique}) on {cfg.dataset}: {e.source.n_train} images, "
            f"{e.steps_per_epoch} steps/epoch, {cfg.epochs} epochs, device {e.device}"
            + (f", {e.d.world} processes" if e.d.enabled else "")
        )

    def on_epoch_start(self, epoch: int) -> None:
        self.prog.start(self.e.steps_per_epoch, desc=f"epoch {epoch}/{self.e.cfg.epochs}")

    def on_batch_end(self, i: int, loss: Tensor, correct: Tensor, seen: int, t0: float) -> None:
        if not self.prog.showing_bar:
            return
        # the postfix needs host values (a sync); every 10 steps is enough for the eye
        post = {}
        if i % 10 == 0 or i + 1 == self.e.steps_per_epoch:
            rate = seen * self.e.d.world / max(time.perf_counter() - t0, 1e-9)
            post = {"loss": f"{float(loss):.3f}", "acc": f"{float(correct) / max(seen, 1):.3f}", "img_s": f"{rate:.0f}"}
        self.prog.advance(1, post)

    def on_epoch_end(self, row: dict[str, Any]) -> None:
        self.prog.close()
        self.prog.line(
            f"epoch {row['epoch']}/{self.e.cfg.epochs}  train_loss {row['train_loss']:.4f} "
            f"train_acc {row['train_acc']:.4f}  val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f}  "
            f"lr {row['lr']:.4g}  {row['epoch_s']:.1f}s  {row['images_per_s']:.0f} img/s"
        )

    def on_run_end(self, summary: dict[str, Any]) -> None:
        self.prog.close()
        s = self.state
        if summary["status"] == "diverged":
            epoch = summary["diverged_epoch"]
            self.prog.line(f"training diverged in epoch {epoch} (non-finite loss); metrics of earlier epochs kept")
        elif summary["status"] == "completed":
            self.prog.line(
                f"done: test_acc {summary['test_acc']:.4f}, best val_acc {s.best_acc:.4f} (epoch {s.best_epoch}), "
                f"{s.elapsed:.0f}s"
            )

    def close(self) -> None:
        self.prog.close()
