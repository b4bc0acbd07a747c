"""The training loop: :func:`train` orchestrates a run, :func:`train_one_epoch` trains one
epoch, :func:`evaluate` measures the model.

The parts it is made of live beside it: the run's fixed parts and state
(:mod:`reslab.engine.state`, built by :mod:`reslab.engine.build`), where batches come from
(:mod:`reslab.engine.sources`), the learning-rate schedule (:mod:`reslab.engine.optim`),
processes (:mod:`reslab.engine.distributed`), checkpoints (:mod:`reslab.engine.checkpoint`)
and every job around the loop as a callback (:mod:`reslab.engine.callbacks`). Reading and
writing run folders' status is :mod:`reslab.engine.runs`.

Because every random choice of an epoch is derived from ``(seed, epoch)`` and the
optimizer state and step counter are checkpointed after every epoch, ``resume=True``
continues a killed run exactly: on the CPU, the resumed run's ``metrics.jsonl`` (apart
from the wall-clock fields ``epoch_s``, ``elapsed_s`` and ``images_per_s``) and final
weights equal an uninterrupted run's bit for bit. Under ``torchrun`` the engine trains
with DistributedDataParallel: every rank draws the same global batch and takes its slice,
so a 2-process run sees the same images and augmentations as a 1-process run with the
same global batch; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from reslab.engine import runs
from reslab.engine.build import build_engine, initial_summary, open_run_dataset, resolve_config, set_threads
from reslab.engine.callbacks import Callback, default_callbacks, run_end
from reslab.engine.checkpoint import read_checkpoint
from reslab.engine.config import TrainConfig, read_config_file
from reslab.engine.devices import device_name
from reslab.engine.distributed import Dist, all_finite, resolve_device, setup_distributed
from reslab.engine.optim import lr_at
from reslab.engine.runs import RUN_FILES
from reslab.engine.sources import augment_gather, derive_seed, epoch_draws
from reslab.engine.state import Engine, EpochResult, RunState
from reslab.errors import DivergedError, UsageError

__all__ = [
    "RUN_FILES",
    "WALL_CLOCK_FIELDS",
    "TrainConfig",
    "lr_at",
    "read_config_file",
    "train",
]

#: metrics.jsonl fields that measure time, so differ between otherwise identical runs
WALL_CLOCK_FIELDS = ("epoch_s", "elapsed_s", "images_per_s")


def train(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train ``config`` and write the run folder ``out_dir``; return summary.json's content.

    Args:
        resume: continue from ``out_dir/checkpoint`` (the saved config must agree with
            ``config`` except for :data:`reslab.engine.config.RESUMABLE_CHANGES`).
        overwrite: replace a run already in ``out_dir`` (only the run's own files are
            removed). Without it, an existing run is refused with a :class:`UsageError`.
        progress: ``None`` = a tqdm bar on a terminal, one line per epoch otherwise;
            ``True`` = always the bar; ``False`` = silent.
        on_epoch: called with each epoch's metrics row (rank 0 only).

    Outcome:
        * Completed: ``status == "completed"`` with ``test_acc``/``test_loss``.
        * **Divergence is returned, not raised**: a non-finite training loss stops the
          run and returns ``status == "diverged"`` with ``diverged_epoch``; the metrics of
          the epochs before it are kept and no final weights are written. (The CLI exits
          with status 3.) :class:`~reslab.errors.DivergedError` is not raised by this
          function; it is for callers that want to turn the status into an exception.
        * Ctrl-C (``KeyboardInterrupt``): summary.json is written with
          ``status == "interrupted"`` (the checkpoint of the last complete epoch stays
          usable for ``resume=True``) and the ``KeyboardInterrupt`` is re-raised.
        * Bad configuration, missing data or an incompatible checkpoint: :class:`UsageError`
          before anything in ``out_dir`` is changed.
    """
    config.ensure_valid()  # commands and compare pass a config they built and validated
    out = Path(out_dir)
    d = setup_distributed(device_name(config.device))
    try:
        # rank 0 holds the folder's lock for the whole run: a second call on it is refused, never raced
        with runs.locked([out] if d.main else []):
            return _train(config, out, d, resume, overwrite, progress, on_epoch)
    finally:
        d.close()


def _train(
    config: TrainConfig,
    out: Path,
    d: Dist,
    resume: bool,
    overwrite: bool,
    progress: bool | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    """:func:`train` once its processes are set up."""
    set_threads(config, d)
    resume, overwrite = runs.plan_run(out, config, resume, overwrite)  # before touching anything
    d.barrier()  # every rank has looked at out_dir before rank 0 writes to it
    device = resolve_device(config, d)
    ds = open_run_dataset(config)
    cfg = resolve_config(config, ds, device)
    if cfg.batch_size % d.world:
        raise UsageError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({d.world})")
    ckpt = read_checkpoint(out, cfg) if resume else None
    engine, state = build_engine(cfg, ds, d, device, out, ckpt)
    summary = initial_summary(engine, state)
    callbacks = default_callbacks(engine, state, summary, out, overwrite and not resume, progress, on_epoch)
    epoch = state.start_epoch
    try:
        for epoch in range(state.start_epoch, engine.cfg.epochs + 1):
            t0 = time.perf_counter()
            result = train_one_epoch(engine, state, epoch, callbacks)
            if result is None:
                summary.update(status="diverged", diverged_epoch=epoch, epochs_completed=epoch - 1)
                summary["elapsed_s"] = state.elapsed + time.perf_counter() - t0
                run_end(callbacks, summary)
                return summary
            val_loss, val_acc = evaluate(engine, "val")
            row = state.record_epoch(epoch, result, val_loss, val_acc, time.perf_counter() - t0)
            summary.update(epochs_completed=epoch, best_val_acc=state.best_acc, best_epoch=state.best_epoch)
            summary.update(elapsed_s=round(state.elapsed, 3))
            for cb in callbacks:
                cb.on_epoch_end(row)
        test_loss, test_acc = final_test_result(engine, state)
        run_end(callbacks, summary, status="completed", test_acc=test_acc, test_loss=test_loss)
        d.barrier()
        return summary
    except KeyboardInterrupt:
        with contextlib.suppress(UsageError):  # a full disk must not hide the interrupt
            run_end(callbacks, summary, status="interrupted", interrupted_epoch=epoch)
        raise
    except Exception as e:
        # out of memory, a failed write or any other stop: say so, so that the next run knows what
        # it finds (where the disk lets it), and raise the first error, not the record's
        with contextlib.suppress(UsageError):
            run_end(
                callbacks, summary, status="failed", failed_epoch=epoch, error=f"{type(e).__name__}: {str(e)[:300]}"
            )
        raise
    finally:
        for cb in callbacks:
            cb.close()


def train_one_epoch(e: Engine, state: RunState, epoch: int, callbacks: Sequence[Callback]) -> EpochResult | None:
    """Train epoch ``epoch`` (advancing ``state.step``, and adding the validations inside
    the epoch to ``state.evals``); ``None`` when the loss became non-finite."""
    cfg, d = e.cfg, e.d
    t0 = time.perf_counter()
    order, aug = epoch_draws(cfg, epoch, e.source.n_train)
    # DropPath and other in-model randomness: per epoch (and rank), so resume is exact
    torch.manual_seed(derive_seed(cfg.seed, epoch, 2, d.rank))
    loss_sum = torch.zeros((), dtype=torch.float64, device=e.device)
    correct = torch.zeros((), dtype=torch.float64, device=e.device)
    seen, eval_time, lr, mid_evals = 0, 0.0, cfg.lr, e.mid_evals
    e.model.train()
    for cb in callbacks:
        cb.on_epoch_start(epoch)
    pad = cfg.crop_padding or 0
    batches = e.source.train_batches(order, aug, cfg.batch_size, e.steps_per_epoch)
    for i, (xb, yb, (ady, adx, aflip)) in enumerate(batches):
        lr = lr_at(state.step, e.total_steps, cfg)
        for group in e.optimizer.param_groups:
            group["lr"] = lr
        x = e.norm.from_uint8(augment_gather(xb, ady, adx, aflip, pad, cfg.channels_last), cfg.channels_last)
        check = (i + 1) % e.check_every == 0 or i + 1 == e.steps_per_epoch
        if e.graphed is not None:
            # the whole step, update included, in one replay: a non-finite loss is seen after
            # its update, and a diverged run's weights are never saved, so the result is the same
            loss, logits = e.graphed(x, yb, lr)
            state.step += 1
            if check and not all_finite(d, loss.item()):
                return None
        else:
            with e.autocast():
                logits = e.model(x)
                loss = e.criterion(logits.float(), yb)
            e.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.step += 1
            for cb in callbacks:
                cb.on_backward(state.step, epoch)
            if check and not all_finite(d, loss.item()):
                return None
            e.optimizer.step()
        ld = loss.detach()
        loss_sum += ld.double() * len(yb)
        correct += (logits.detach().argmax(1) == yb).sum().double()
        seen += len(yb)
        for cb in callbacks:
            cb.on_batch_end(i, ld, correct, seen, t0)
        if i + 1 in mid_evals:
            te = time.perf_counter()
            vl, va = evaluate(e, "val")
            state.evals.append(
                {
                    "epoch": round(epoch - 1 + (i + 1) / e.steps_per_epoch, 4),
                    "step": state.step,
                    "val_loss": vl,
                    "val_acc": va,
                }
            )
            eval_time += time.perf_counter() - te
    # an inf that never showed in a checked step (checks are spaced on GPUs)
    if not all_finite(d, float(loss_sum)):
        return None
    train_s = time.perf_counter() - t0 - eval_time
    n = torch.tensor(float(seen), dtype=torch.float64, device=e.device)
    totals = d.all_sum(torch.stack([loss_sum, correct, n]))
    return EpochResult(
        float(totals[0]) / float(totals[2]), float(totals[1]) / float(totals[2]), float(totals[2]), train_s, lr
    )


def evaluate(e: Engine, which: str) -> tuple[float, float]:
    """``(loss, accuracy)`` of the model on the ``"val"`` or ``"test"`` images, summed over ranks."""
    model, cfg, d = e.raw_model, e.cfg, e.d
    d.sync_buffers(model)
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=e.device)
    correct = torch.zeros((), dtype=torch.float64, device=e.device)
    count = torch.zeros((), dtype=torch.float64, device=e.device)
    with torch.inference_mode():
        for x, y in e.source.eval_batches(which, cfg.eval_batch_size):
            with e.autocast():
                logits = model(e.norm.from_uint8(x, cfg.channels_last))
            # plain cross-entropy (no smoothing): the loss a reader expects to compare
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum().double()
            count += len(y)
    totals = d.all_sum(torch.stack([loss_sum, correct, count]))
    model.train()
    n = max(float(totals[2]), 1.0)
    return float(totals[0]) / n, float(totals[1]) / n


def final_test_result(e: Engine, state: RunState) -> tuple[float, float]:
    """``(loss, accuracy)`` on the test images of the trained model: the last epoch's validation
    when the validation images are the test images (``val_size`` 0, every test image used), which
    was the same pass over the same weights, else a pass of its own."""
    last = state.metrics[-1] if state.metrics else None
    if e.source.val_is_test and last is not None and last["epoch"] == e.cfg.epochs:
        return last["val_loss"], last["val_acc"]
    return evaluate(e, "test")


def raise_if_diverged(summary: dict[str, Any]) -> dict[str, Any]:
    """Turn a ``diverged`` summary into :class:`DivergedError` (for callers who prefer it)."""
    if summary.get("status") == "diverged":
        raise DivergedError(f"training diverged in epoch {summary.get('diverged_epoch')}", summary["diverged_epoch"])
    return summary
