"""The training engine and its run folders.

In-memory datasets live on the training device as one uint8 tensor; each epoch draws a
permutation and the augmentation (random crop as a translation with zero fill, and
horizontal flip) from a generator seeded by ``(seed, epoch)``, and applies both to whole
batches with one gather. Nothing in the hot loop runs per image in Python.

Because every random choice of an epoch is derived from ``(seed, epoch)`` and the
optimizer state and step counter are checkpointed after every epoch, ``resume=True``
continues a killed run exactly: on the CPU, the resumed run's ``metrics.jsonl`` (apart
from the wall-clock fields ``epoch_s``, ``elapsed_s`` and ``images_per_s``) and final
weights equal an uninterrupted run's bit for bit.

Run folder layout: see ``docs/architecture.md``. With ``probe_every = K``,
``gradients.jsonl`` gets one JSON object every K optimizer steps, taken from ``.grad``
right after the backward pass (before the optimizer step; no extra backward):
``{"step": S, "epoch": E, "<block name>": norm, ...}`` where ``step`` counts optimizer
steps from 1 over the whole run, ``epoch`` is 1-based, and each further key is a
residual block's qualified name (:func:`reslab.blocks.residual_blocks`, forward order)
mapped to the L2 norm of the gradients of all that block's parameters (shortcut
projection and technique parameters included). Under DDP the gradients are the
all-reduced ones. Under ``torchrun`` the engine trains with
DistributedDataParallel: every rank draws the same global batch and takes its slice, so
a 2-process run sees the same images and augmentations as a 1-process run with the same
global batch; only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reslab.blocks import residual_blocks
from reslab.checkpoint import (
    atomic_write,
    atomic_write_text,
    load_into,
    load_state,
    read_metadata,
    save_weights,
    spec_from_metadata,
    torch_load_safe,
)
from reslab.config import RESUMABLE_CHANGES, TrainConfig, config_to_yaml, default_threads, read_config_file
from reslab.data import ArrayDataset, FolderDataset, open_dataset
from reslab.describe import count_params, forward_flops
from reslab.errors import DivergedError, UsageError
from reslab.models import build_model, channels_last_safe

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
#: what a run writes; ``overwrite`` removes exactly these, nothing else in the folder
RUN_FILES = (
    "config.yaml",
    "metrics.jsonl",
    "summary.json",
    "model.safetensors",
    "model-best.safetensors",
    "checkpoint",
    "gradients.jsonl",
    "evals.jsonl",
    "tensorboard",
)
#: validation images held out for these datasets; others hold out 10%
DEFAULT_VAL_SIZE = {"fashion-mnist": 5000, "cifar10": 5000, "cifar100": 5000}
#: the train/validation split and ``train_subset`` use this fixed seed, so runs with
#: different seeds are compared on the same validation images
SPLIT_SEED = 0


# ---------------------------------------------------------------------------------------
# Small pieces


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integers, well mixed (neighbouring epochs get unrelated streams)."""
    h = hashlib.sha256(",".join(str(int(k)) for k in keys).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total``.

    Warm-up rises linearly to ``cfg.lr`` over the first ``warmup * total`` steps; then
    ``onecycle`` decays linearly to zero at the last step, ``cosine`` follows half a
    cosine to zero and ``constant`` stays at ``cfg.lr``.
    """
    warm = round(cfg.warmup * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(total - warm, 1)
    t = (step - warm) / span  # 0 at the peak, approaching 1 at the end
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    return cfg.lr * (1.0 - t)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv and linear weights only: BatchNorm affine parameters, biases,
    and the techniques' gains (scale, alpha, gamma, Fixup scalars) are left undecayed,
    since shrinking them towards zero changes what the block computes, not its capacity."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear)):
                decay.append(p)
            else:
                no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def augment_gather(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, pad: int, channels_last: bool) -> Tensor:
    """Random-crop (a shift by ``dy``, ``dx`` in ``[-pad, pad]`` with zero fill, i.e.
    pad-and-crop) and horizontal flip of a uint8 batch, in one gather.

    Output pixel ``(i, j)`` of image ``b`` is input pixel ``(i + dy, j' + dx)`` with
    ``j' = W - 1 - j`` where flipped, else ``j``, or 0 outside the image.
    """
    b, _, h, w = x.shape
    dev = x.device
    if pad > 0:
        x = F.pad(x, (pad, pad, pad, pad))
    rows = torch.arange(h, device=dev).unsqueeze(0) + (dy + pad).unsqueeze(1)  # B x H
    cols = torch.arange(w, device=dev).unsqueeze(0)
    cols = torch.where(flip.unsqueeze(1), (w - 1) - cols, cols) + (dx + pad).unsqueeze(1)  # B x W
    bi = torch.arange(b, device=dev).view(b, 1, 1)
    # advanced indices around a slice put the batch/row/col dims first: B x H x W x C,
    # which viewed as NCHW is channels_last memory already
    out = x[bi, :, rows.unsqueeze(2), cols.unsqueeze(1)].permute(0, 3, 1, 2)
    return out if channels_last else out.contiguous()


class Normalize:
    """uint8 -> float, ``(x / 255 - mean) / std`` as one multiply-add."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> None:
        m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * s)
        self.shift = -m / s

    def __call__(self, x: Tensor, channels_last: bool) -> Tensor:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return torch.addcmul(self.shift, x.to(torch.float32, memory_format=fmt), self.scale)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    #: where collectives run: NCCL only reduces CUDA tensors, gloo CPU ones
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: Tensor) -> Tensor:
        """Sum over ranks (identity in one process); the result is on the CPU."""
        if self.enabled:
            import torch.distributed as dist

            t = t.to(self.device)
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu()

    def sync_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's BatchNorm running statistics (each rank updated its
        own from its half of the batch), so evaluation shards agree with the saved model."""
        if self.enabled:
            import torch.distributed as dist

            for b in model.buffers():
                dist.broadcast(b, 0)

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def _setup_distributed(device_name: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_name.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    dev = torch.device(f"cuda:{local}") if device_name.startswith("cuda") else torch.device("cpu")
    return Dist(rank=rank, world=world, local_rank=local, device=dev)


def _resolve_device(cfg: TrainConfig, d: Dist) -> torch.device:
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("device cuda was asked for but no CUDA GPU is available; use --device cpu")
        if d.enabled and name == "cuda":
            name = f"cuda:{d.local_rank}"
    return torch.device(name)


# ---------------------------------------------------------------------------------------
# Data sources: where batches come from, the same interface for arrays and folders


class _ArraySource:
    def __init__(self, ds: ArrayDataset, cfg: TrainConfig, device: torch.device, d: Dist) -> None:
        n = len(ds.train_x)
        split = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
        val_size = cfg.val_size or 0
        if val_size >= n:
            raise UsageError(f"val_size {val_size} leaves no training images ({n} in all); pass a smaller --val-size")
        val_idx, train_idx = split[:val_size], split[val_size:]
        if cfg.train_subset is not None:
            train_idx = train_idx[: cfg.train_subset]
        self.device = device
        self.d = d
        self.train_x = ds.train_x[train_idx].to(device)
        self.train_y = ds.train_y[train_idx].to(device)
        if val_size:
            self.val = (ds.train_x[val_idx].to(device), ds.train_y[val_idx].to(device))
        else:
            self.val = (ds.test_x.to(device), ds.test_y.to(device))
        test_idx = _test_subset(len(ds.test_x), cfg.test_subset)
        self.test = (ds.test_x[test_idx].to(device), ds.test_y[test_idx].to(device))
        self.n_train = len(train_idx)
        self.chance_acc = _chance_acc(ds.test_y[test_idx].tolist())

    def train_batches(
        self, order: Tensor, aug: tuple[Tensor, Tensor, Tensor], batch: int, steps: int, start: int = 0
    ) -> Iterator[tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]]:
        local = batch // self.d.world
        for s in range(start, steps):
            lo = s * batch + self.d.rank * local
            idx = order[lo : lo + local]
            dev_idx = idx.to(self.device, non_blocking=True)
            a = tuple(t[lo : lo + local].to(self.device, non_blocking=True) for t in aug)
            yield self.train_x[dev_idx], self.train_y[dev_idx], a  # type: ignore[misc]

    def eval_batches(self, which: str, batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = self.val if which == "val" else self.test
        # ranks take interleaved shards; sums are reduced across ranks afterwards
        for i in range(self.d.rank * batch, len(x), batch * self.d.world):
            yield x[i : i + batch], y[i : i + batch]


class _FolderSource:
    def __init__(self, ds: FolderDataset, cfg: TrainConfig, device: torch.device, d: Dist) -> None:
        n = len(ds.train_files)
        split = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
        val_size = cfg.val_size or 0
        if val_size >= n:
            raise UsageError(f"val_size {val_size} leaves no training images ({n} in all); pass a smaller --val-size")
        files = ds.train_files
        val = [files[i] for i in split[:val_size]]
        train = [files[i] for i in split[val_size:]]
        if cfg.train_subset is not None:
            train = train[: cfg.train_subset]
        self.ds, self.device, self.d, self.workers = ds, device, d, cfg.workers
        self.train_files = train
        self.val_files = val if val_size else ds.test_files
        self.test_files = [ds.test_files[i] for i in _test_subset(len(ds.test_files), cfg.test_subset).tolist()]
        self.n_train = len(train)
        self.chance_acc = _chance_acc([label for _, label in self.test_files])

    def train_batches(
        self, order: Tensor, aug: tuple[Tensor, Tensor, Tensor], batch: int, steps: int, start: int = 0
    ) -> Iterator[tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]]:
        local = batch // self.d.world
        pos = torch.cat(
            [
                torch.arange(s * batch + self.d.rank * local, s * batch + (self.d.rank + 1) * local)
                for s in range(start, steps)
            ]
        )
        loader = self.ds.loader(self.train_files, local, order[pos], self.workers)
        for k, (x, y) in enumerate(loader):
            p = pos[k * local : (k + 1) * local]
            yield (
                x.to(self.device, non_blocking=True),
                y.to(self.device, non_blocking=True),
                tuple(t[p].to(self.device) for t in aug),  # type: ignore[misc]
            )

    def eval_batches(self, which: str, batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        files = self.val_files if which == "val" else self.test_files
        mine = files[self.d.rank :: self.d.world]
        for x, y in self.ds.loader(mine, batch, None, self.workers):
            yield x.to(self.device), y.to(self.device)


def _test_subset(n: int, subset: int | None) -> Tensor:
    """Indices of the test images used: all, or the first ``subset`` of a fixed shuffle (the same
    images for every run, seed and technique, so test accuracies stay paired)."""
    if subset is None or subset >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))[:subset].sort().values


def _chance_acc(labels: list[int]) -> float:
    """Test accuracy of a constant prediction of the most frequent class: what a run that
    lost its weights (diverged) is worth; comparisons count a diverged run at this level."""
    if not labels:
        return 0.0
    return Counter(labels).most_common(1)[0][1] / len(labels)


# ---------------------------------------------------------------------------------------
# Run folder state


def _read_summary(out: Path) -> dict[str, Any] | None:
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, alive
        return True
    return True


def _run_state(out: Path) -> str | None:
    """``None`` for no run here, else the recorded status (``unknown`` if unreadable).

    A ``running`` status whose process is gone (summary.json records the pid and host of
    the process training it) is ``stale``: killed, or stopped by an error before it could
    say so. A run recorded on another host stays ``running``: it cannot be checked.
    """
    if not any((out / f).exists() for f in RUN_FILES):
        return None
    summary = _read_summary(out)
    if summary is None or "status" not in summary:
        return "unknown"
    status = str(summary["status"])
    if status == "running" and summary.get("host", socket.gethostname()) == socket.gethostname():
        pid = summary.get("pid")
        if not isinstance(pid, int) or pid == os.getpid() or not _process_alive(pid):
            return "stale"
    return status


_STATE_WORDS = {"stale": "its process is gone", "unknown": "its summary.json is unreadable"}


def _owner(out: Path) -> str:
    summary = _read_summary(out) or {}
    return f"process {summary.get('pid', '?')} on {summary.get('host', '?')}"


def _extendable(saved: dict[str, Any]) -> bool:
    """Can a run be given more epochs and stay the run it would have been with them
    from the start? Only where the learning rate of every step already taken does not
    depend on the total: a constant schedule without warm-up."""
    return saved.get("schedule") == "constant" and not saved.get("warmup")


def _remove_run(out: Path) -> None:
    for f in RUN_FILES:
        p = out / f
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line torn by a kill mid-write
                break
    return rows


def _check_resume_config(saved: dict[str, Any], cfg: TrainConfig, out: Path) -> None:
    may_change = RESUMABLE_CHANGES | ({"epochs"} if _extendable(saved) else set())
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


# ---------------------------------------------------------------------------------------
# Progress output


class _Progress:
    """tqdm bar with loss, accuracy, images/s and ETA on a terminal; else one line per epoch."""

    def __init__(self, mode: bool | None, enabled: bool) -> None:
        tty = sys.stderr.isatty()
        self.enabled = enabled and mode is not False
        self.bar_mode = self.enabled and (mode is True or (mode is None and tty))
        self.bar: Any = None

    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int) -> None:
        if self.bar_mode:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch}/{epochs}", file=sys.stderr, leave=True)

    def step(self, n: int, **postfix: Any) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def end_epoch(self, row: dict[str, Any], epochs: int) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.enabled:
            val = f"val_loss {row['val_loss']:.4f} val_acc {row['val_acc']:.4f}"
            print(
                f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f} train_acc {row['train_acc']:.4f}  "
                f"{val}  lr {row['lr']:.4g}  {row['epoch_s']:.1f}s  {row['images_per_s']:.0f} img/s",
                file=sys.stderr,
                flush=True,
            )

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------------------------------
# The engine


def resolve_config(cfg: TrainConfig, ds: ArrayDataset | FolderDataset, device: torch.device) -> TrainConfig:
    """Fill the dataset- and machine-dependent fields so the saved config says what ran."""
    changes: dict[str, Any] = {"device": str(device)}
    if cfg.val_size is None:
        n = len(ds.train_x) if isinstance(ds, ArrayDataset) else len(ds.train_files)
        changes["val_size"] = DEFAULT_VAL_SIZE.get(ds.name, n // 10)
    if cfg.flip is None:
        changes["flip"] = ds.flip
    if cfg.crop_padding is None:
        changes["crop_padding"] = ds.crop_padding
    if cfg.precision == "auto":
        changes["precision"] = "bf16" if device.type == "cuda" else "fp32"
    return cfg.replace(**changes)


def _evaluate(
    model: nn.Module, source: Any, which: str, cfg: TrainConfig, norm: Normalize, d: Dist, autocast: Any
) -> tuple[float, float]:
    d.sync_buffers(model)
    model.eval()
    dev = norm.scale.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.float64, device=dev)
    count = torch.zeros((), dtype=torch.float64, device=dev)
    with torch.inference_mode():
        for x, y in source.eval_batches(which, cfg.eval_batch_size):
            with autocast():
                logits = model(norm(x, cfg.channels_last))
            # plain cross-entropy (no smoothing): the loss a reader expects to compare
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum().double()
            count += len(y)
    totals = d.all_sum(torch.stack([loss_sum, correct, count]))
    model.train()
    n = max(float(totals[2]), 1.0)
    return float(totals[0]) / n, float(totals[1]) / n


def _block_grad_norms(blocks: list[tuple[str, nn.Module]]) -> list[float]:
    norms = []
    for _, b in blocks:
        grads = [p.grad for p in b.parameters() if p.grad is not None]
        if grads:
            norms.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
        else:
            norms.append(torch.zeros((), device=next(b.parameters()).device))
    return torch.stack(norms).float().cpu().tolist()


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
            ``config`` except for :data:`reslab.config.RESUMABLE_CHANGES`).
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
    cfg = config
    cfg.validate()
    out = Path(out_dir)
    d = _setup_distributed(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif d.enabled and not torch.cuda.is_available():
        # N processes on one CPU would otherwise each start a thread per core
        torch.set_num_threads(max(1, default_threads() // int(os.environ.get("LOCAL_WORLD_SIZE", d.world))))

    # --- decide what to do with out_dir before touching anything ----------------------
    state = _run_state(out)
    latest = out / "checkpoint" / "latest.json"
    # killed, interrupted or failed before its first checkpoint: nothing worth keeping, so
    # a plain re-run and --resume both start it again (the partial files are replaced)
    restartable = state in ("stale", "interrupted", "failed", "unknown") and not latest.is_file()
    if state == "running" and not overwrite:
        elsewhere = (_read_summary(out) or {}).get("host") != socket.gethostname()
        if not (resume and elsewhere and latest.is_file()):
            gone = "if it is gone, pass --resume to continue" if elsewhere else "or pass --overwrite to replace it"
            raise UsageError(
                f"{out} is being trained right now by {_owner(out)}; wait for it to finish or stop it first ({gone})"
            )
    if resume and not overwrite:
        if restartable or state is None:
            resume, overwrite = False, True  # --resume of a run with no checkpoint starts it
        elif not latest.is_file():
            raise UsageError(
                f"nothing to resume in {out}: its {state} run has no checkpoint; pass --overwrite to replace it"
            )
        elif state == "completed":
            saved = read_config_file(out / "config.yaml") if (out / "config.yaml").is_file() else {}
            done = int(saved.get("epochs") or 0)
            if cfg.epochs <= done:
                raise UsageError(
                    f"the run in {out} is already completed ({done} epochs); to extend it pass --epochs N "
                    f"with N > {done}, or pass --overwrite to retrain"
                )
            if not _extendable(saved):
                why = (
                    f"its {saved.get('schedule')} schedule already brought the learning rate down to zero at "
                    f"epoch {done}"
                    if saved.get("schedule") != "constant"
                    else f"its warm-up ({saved.get('warmup')}) was a fraction of {done} epochs, so more epochs "
                    "would change the learning rate of steps already taken"
                )
                raise UsageError(
                    f"the run in {out} cannot be extended honestly: {why}; start a new run with --epochs "
                    f"{cfg.epochs} in another --out (runs trained with --schedule constant --warmup 0 can be extended)"
                )
    elif not resume and state is not None and not overwrite:
        if restartable:
            overwrite = True
        elif state == "completed":
            raise UsageError(
                f"{out} already holds a completed run; pass --overwrite to replace it, "
                "or --resume --epochs N to extend it"
            )
        elif state == "diverged":
            raise UsageError(f"{out} already holds a diverged run; pass --overwrite to replace it (try a lower --lr)")
        else:
            raise UsageError(
                f"{out} already holds an unfinished run ({_STATE_WORDS.get(str(state), state)}, checkpointed); "
                "pass --resume to continue it or --overwrite to replace it"
            )

    # every rank has looked at out_dir before rank 0 writes to it
    d.barrier()
    device = _resolve_device(cfg, d)
    try:
        ds = open_dataset(cfg.dataset, cfg.data_dir)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if isinstance(ds, FolderDataset) and cfg.image_size is not None:
        ds.image_size = (cfg.image_size, cfg.image_size)
    cfg = resolve_config(cfg, ds, device)
    if cfg.batch_size % d.world:
        raise UsageError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({d.world})")

    ckpt_info: dict[str, Any] | None = None
    if resume:
        try:
            ckpt_info = json.loads(latest.read_text())
            if not {"state", "weights"} <= set(ckpt_info):
                raise KeyError("state")
        except (OSError, ValueError, KeyError, TypeError):
            raise UsageError(f"{latest} is unreadable; the checkpoint is damaged, start a new run") from None
        saved_cfg = torch_load_safe(out / "checkpoint" / ckpt_info["state"])["config"]
        _check_resume_config(saved_cfg, cfg, out)
        meta = read_metadata(out / "checkpoint" / ckpt_info["weights"])
        spec = spec_from_metadata(meta, out / "checkpoint" / ckpt_info["weights"])
        if spec.name != cfg.model or spec.technique != cfg.technique:
            raise UsageError(
                f"the checkpoint weights in {out} are for model {spec.name} with technique {spec.technique}, "
                f"not {cfg.model} with {cfg.technique}"
            )

    # --- model, optimizer, data ----------------------------------------------------------
    c, h, w = ds.input_size
    torch.manual_seed(derive_seed(cfg.seed, 0, 0))
    try:
        model = build_model(
            cfg.model,
            technique=cfg.technique,
            num_classes=ds.num_classes,
            in_channels=c,
            width=cfg.width,
            drop_path_rate=cfg.drop_path_rate,
            technique_args=dict(cfg.technique_args),
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    pretrained_note = ""
    if cfg.init_weights and ckpt_info is None:  # a resumed run takes its checkpoint's weights
        from reslab.pretrained import load_pretrained

        pretrained_note = load_pretrained(model, cfg.init_weights).summary()
    params = count_params(model)
    flops = forward_flops(model, (c, h, w))
    model.to(device)
    if cfg.channels_last and not channels_last_safe(model, device):
        cfg = cfg.replace(channels_last=False)  # see channels_last_safe: a CPU kernel bug
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    raw_model = model
    blocks = residual_blocks(raw_model)

    source: Any = (_ArraySource if isinstance(ds, ArrayDataset) else _FolderSource)(ds, cfg, device, d)
    steps_per_epoch = source.n_train // cfg.batch_size
    if steps_per_epoch < 1:
        raise UsageError(
            f"batch_size {cfg.batch_size} is larger than the {source.n_train} training images; pass a smaller one"
        )
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.SGD(
        param_groups(raw_model, cfg.weight_decay),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
    )

    metrics: list[dict[str, Any]] = []
    #: validation inside epochs (evals_per_epoch > 1), for time-to-target at sub-epoch resolution
    evals: list[dict[str, Any]] = []
    start_epoch, step, elapsed = 1, 0, 0.0
    best_acc, best_epoch = -1.0, 0
    if ckpt_info is not None:
        st = torch_load_safe(out / "checkpoint" / ckpt_info["state"])
        load_into(raw_model, load_state(out / "checkpoint" / ckpt_info["weights"], device), out / "checkpoint")
        try:
            optimizer.load_state_dict(st["optimizer"])
        except (ValueError, KeyError) as e:
            raise UsageError(f"the optimizer state in {out}/checkpoint does not fit the model ({e})") from None
        start_epoch, step, elapsed = int(st["epoch"]) + 1, int(st["step"]), float(st["elapsed_s"])
        best_acc, best_epoch = float(st["best_val_acc"]), int(st["best_epoch"])
        metrics = list(st["metrics"])
        evals = list(st.get("evals", []))

    train_model: nn.Module = raw_model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        if device.type != "cuda":
            silence_cuda_home_warning()
        train_model = torch.compile(train_model)  # type: ignore[assignment]

    use_bf16 = cfg.precision == "bf16"
    if use_bf16 and device.type == "cpu":

        def autocast() -> Any:
            return torch.autocast("cpu", dtype=torch.bfloat16)
    elif use_bf16:

        def autocast() -> Any:
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:

        def autocast() -> Any:
            return nullcontext()

    norm = Normalize(ds.mean, ds.std, device)
    meta_extra = {
        "input_size": [c, h, w],
        "dataset": cfg.dataset,
        "classes": list(ds.classes),
        "mean": list(ds.mean),
        "std": list(ds.std),
    }

    # --- files ----------------------------------------------------------------------------
    writer: Any = None
    grad_file: Any = None
    summary: dict[str, Any] = {
        "status": "running",
        "model": cfg.model,
        "technique": cfg.technique,
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "epochs_completed": start_epoch - 1,
        "best_val_acc": best_acc if best_epoch else None,
        "best_epoch": best_epoch or None,
        "test_acc": None,
        "test_loss": None,
        "elapsed_s": elapsed,
        "params": params,
        "flops": flops,
        "val_source": "val" if cfg.val_size else "test",
        "chance_acc": source.chance_acc,
        "world_size": d.world,
        "device": str(device),
        # who is training it: a later run tells a live run from one whose process is gone
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }
    if d.main:
        if overwrite and not resume:
            # only now: every check that could refuse the run has passed
            _remove_run(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", config_to_yaml(cfg))
        _write_jsonl(out / "metrics.jsonl", metrics)
        if cfg.evals_per_epoch > 1:
            _write_jsonl(out / "evals.jsonl", evals)
        _write_json(out / "summary.json", summary)
        if cfg.probe_every:
            # keep the records up to the checkpoint's step; later ones will be recomputed
            kept = [r for r in _read_jsonl(out / "gradients.jsonl") if r.get("step", 1 << 62) <= step]
            _write_jsonl(out / "gradients.jsonl", kept)
            grad_file = open(out / "gradients.jsonl", "a", encoding="utf-8")  # closed in finally
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError(
                    "--tensorboard needs the tensorboard package: pip install 'reslab[tensorboard]'"
                ) from None
            writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_epoch)

    prog = _Progress(progress, d.main)
    if pretrained_note:
        prog.message(f"initial weights from {cfg.init_weights}: " + pretrained_note.replace("\n", "; "))
    prog.message(
        f"training {cfg.model} ({cfg.technique}) on {cfg.dataset}: {source.n_train} images, "
        f"{steps_per_epoch} steps/epoch, {cfg.epochs} epochs, device {device}"
        + (f", {d.world} processes" if d.enabled else "")
    )

    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    check_every = 1 if device.type == "cpu" else 25
    # steps (1-based, within an epoch) after which the validation set is evaluated besides the epoch's end
    mid_evals = {round(k * steps_per_epoch / cfg.evals_per_epoch) for k in range(1, cfg.evals_per_epoch)}
    mid_evals -= {0, steps_per_epoch}
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, 1))
            order = torch.randperm(source.n_train, generator=g)
            pad = cfg.crop_padding or 0
            n = source.n_train
            dy = torch.randint(-pad, pad + 1, (n,), generator=g)
            dx = torch.randint(-pad, pad + 1, (n,), generator=g)
            flip = torch.rand(n, generator=g) < 0.5 if cfg.flip else torch.zeros(n, dtype=torch.bool)
            # DropPath and other in-model randomness: per epoch (and rank), so resume is exact
            torch.manual_seed(derive_seed(cfg.seed, epoch, 2, d.rank))
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.float64, device=device)
            seen = 0
            diverged = False
            eval_time = 0.0
            train_model.train()
            prog.start_epoch(epoch, cfg.epochs, steps_per_epoch, 0)
            lr = cfg.lr
            for i, (xb, yb, (ady, adx, aflip)) in enumerate(
                source.train_batches(order, (dy, dx, flip), cfg.batch_size, steps_per_epoch)
            ):
                lr = lr_at(step, total_steps, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x = norm(augment_gather(xb, ady, adx, aflip, pad, cfg.channels_last), cfg.channels_last)
                with autocast():
                    logits = train_model(x)
                    loss = criterion(logits.float(), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                step += 1
                if cfg.probe_every and step % cfg.probe_every == 0 and d.main:
                    norms = _block_grad_norms(blocks)
                    rec = {
                        "step": step,
                        "epoch": epoch,
                        **{name: v for (name, _), v in zip(blocks, norms, strict=True)},
                    }
                    grad_file.write(json.dumps(rec) + "\n")
                if (i + 1) % check_every == 0 or i + 1 == steps_per_epoch:
                    bad = torch.tensor(0.0 if torch.isfinite(loss).item() else 1.0)
                    if d.all_sum(bad).item() > 0:
                        diverged = True
                        break
                optimizer.step()
                ld = loss.detach()
                loss_sum += ld.double() * len(yb)
                correct += (logits.detach().argmax(1) == yb).sum().double()
                seen += len(yb)
                if prog.bar is not None:
                    # the postfix needs host values (a sync); every 10 steps is enough for the eye
                    post = {}
                    if i % 10 == 0 or i + 1 == steps_per_epoch:
                        rate = seen * d.world / max(time.perf_counter() - t0, 1e-9)
                        post = {
                            "loss": f"{float(ld):.3f}",
                            "acc": f"{float(correct) / max(seen, 1):.3f}",
                            "img_s": f"{rate:.0f}",
                        }
                    prog.step(1, **post)
                if i + 1 in mid_evals:
                    te = time.perf_counter()
                    vl, va = _evaluate(raw_model, source, "val", cfg, norm, d, autocast)
                    evals.append(
                        {
                            "epoch": round(epoch - 1 + (i + 1) / steps_per_epoch, 4),
                            "step": step,
                            "val_loss": vl,
                            "val_acc": va,
                        }
                    )
                    eval_time += time.perf_counter() - te
            if not diverged:
                # an inf that never showed in a checked step (checks are spaced on GPUs)
                diverged = d.all_sum(torch.tensor(0.0 if math.isfinite(float(loss_sum)) else 1.0)).item() > 0
            if diverged:
                prog.close()
                summary.update(status="diverged", diverged_epoch=epoch, epochs_completed=epoch - 1)
                summary["elapsed_s"] = elapsed + time.perf_counter() - t0
                prog.message(f"training diverged in epoch {epoch} (non-finite loss); metrics of earlier epochs kept")
                if d.main:
                    _write_json(out / "summary.json", summary)
                return summary
            train_time = time.perf_counter() - t0 - eval_time
            totals = d.all_sum(
                torch.stack([loss_sum, correct, torch.tensor(float(seen), dtype=torch.float64, device=device)])
            )
            val_loss, val_acc = _evaluate(raw_model, source, "val", cfg, norm, d, autocast)
            epoch_s = time.perf_counter() - t0
            elapsed += epoch_s
            row = {
                "epoch": epoch,
                "train_loss": float(totals[0]) / float(totals[2]),
                "train_acc": float(totals[1]) / float(totals[2]),
                "val_loss": val_loss,
                "val_acc": val_acc,
                "lr": lr,
                "epoch_s": round(epoch_s, 3),
                "elapsed_s": round(elapsed, 3),
                "images_per_s": round(float(totals[2]) / train_time, 1),
            }
            metrics.append(row)
            evals.append({"epoch": epoch, "step": step, "val_loss": val_loss, "val_acc": val_acc})
            if val_acc > best_acc:
                best_acc, best_epoch = val_acc, epoch
            summary.update(
                epochs_completed=epoch, best_val_acc=best_acc, best_epoch=best_epoch, elapsed_s=round(elapsed, 3)
            )
            if d.main:
                _save_checkpoint(
                    out, raw_model, optimizer, cfg, epoch, step, elapsed, best_acc, best_epoch, metrics, evals
                )
                if best_epoch == epoch:  # the best-validation weights, kept beside the final ones
                    best_meta = {**meta_extra, "epoch": epoch, "val_acc": val_acc}
                    save_weights(out / "model-best.safetensors", raw_model, extra=best_meta)
                _write_jsonl(out / "metrics.jsonl", metrics)
                if cfg.evals_per_epoch > 1:
                    _write_jsonl(out / "evals.jsonl", evals)
                _write_json(out / "summary.json", summary)
                if grad_file is not None:
                    grad_file.flush()
                if writer is not None:
                    for k in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s"):
                        writer.add_scalar(k, row[k], epoch)
                    writer.flush()
                if on_epoch is not None:
                    on_epoch(row)
            prog.end_epoch(row, cfg.epochs)

        test_loss, test_acc = _evaluate(raw_model, source, "test", cfg, norm, d, autocast)
        summary.update(status="completed", test_acc=test_acc, test_loss=test_loss)
        if d.main:
            save_weights(out / "model.safetensors", raw_model, extra=meta_extra)
            if writer is not None:
                writer.add_scalar("test_acc", test_acc, cfg.epochs)
                writer.add_scalar("test_loss", test_loss, cfg.epochs)
            _write_json(out / "summary.json", summary)
        prog.message(f"done: test_acc {test_acc:.4f}, best val_acc {best_acc:.4f} (epoch {best_epoch}), {elapsed:.0f}s")
        d.barrier()
        return summary
    except KeyboardInterrupt:
        prog.close()
        if d.main:
            summary.update(status="interrupted", interrupted_epoch=epoch)
            _write_json(out / "summary.json", summary)
        raise
    except Exception as e:
        # out of memory or any other stop: say so, so that the next run knows what it finds
        prog.close()
        if d.main:
            summary.update(status="failed", failed_epoch=epoch, error=f"{type(e).__name__}: {str(e)[:300]}")
            _write_json(out / "summary.json", summary)
        raise
    finally:
        prog.close()
        if grad_file is not None:
            grad_file.close()
        if writer is not None:
            writer.close()


def _save_checkpoint(
    out: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    epoch: int,
    step: int,
    elapsed: float,
    best_acc: float,
    best_epoch: int,
    metrics: list[dict[str, Any]],
    evals: list[dict[str, Any]] | None = None,
) -> None:
    """Write epoch ``epoch``'s weights and state under new names, then point latest.json
    at them, then remove older ones: a kill at any moment leaves latest.json naming a
    complete pair."""
    ck = out / "checkpoint"
    weights, state = f"epoch-{epoch:04d}.safetensors", f"epoch-{epoch:04d}.pt"
    save_weights(ck / weights, model, extra={"epoch": epoch})
    payload = {
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "step": step,
        "elapsed_s": elapsed,
        "best_val_acc": best_acc,
        "best_epoch": best_epoch,
        "metrics": metrics,
        "evals": evals or [],
        "config": cfg.to_dict(),
    }
    atomic_write(ck / state, lambda p: torch.save(payload, str(p)))
    _write_json(ck / "latest.json", {"epoch": epoch, "weights": weights, "state": state})
    for p in ck.iterdir():
        if p.name.startswith("epoch-") and p.name not in (weights, state):
            p.unlink(missing_ok=True)


class _NoCudaHomeWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No CUDA runtime is found" not in record.getMessage()


def silence_cuda_home_warning() -> None:
    """Drop torch's "No CUDA runtime is found, using CUDA_HOME=..." warning, which
    ``torch.compile`` triggers on a machine with a CUDA toolkit but no GPU even though
    a CPU compile never uses CUDA. Other messages of that logger still show."""
    log = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaHomeWarning) for f in log.filters):
        log.addFilter(_NoCudaHomeWarning())


def raise_if_diverged(summary: dict[str, Any]) -> dict[str, Any]:
    """Turn a ``diverged`` summary into :class:`DivergedError` (for callers who prefer it)."""
    if summary.get("status") == "diverged":
        raise DivergedError(f"training diverged in epoch {summary.get('diverged_epoch')}", summary["diverged_epoch"])
    return summary
