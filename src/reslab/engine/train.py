"""The training engine: :func:`train` orchestrates a run, :func:`train_one_epoch` trains
one epoch, :func:`evaluate` measures the model, and callbacks (:class:`Callback`) do the
jobs around the loop: the run folder and checkpoints, the gradient-norm probe,
TensorBoard, progress output and the caller's ``on_epoch``. Reading and writing run
folders' status is :mod:`reslab.runs`.

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
residual block's qualified name (:func:`reslab.nn.blocks.residual_blocks`, forward order)
mapped to the L2 norm of the gradients of all that block's parameters (shortcut
projection and technique parameters included). Under DDP the gradients are the
all-reduced ones. Under ``torchrun`` the engine trains with
DistributedDataParallel: every rank draws the same global batch and takes its slice, so
a 2-process run sees the same images and augmentations as a 1-process run with the same
global batch; only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reslab.engine import runs
from reslab.engine.config import RESUMABLE_CHANGES, TrainConfig, config_to_yaml, default_threads, read_config_file
from reslab.engine.data import ArrayDataset, FolderDataset, open_dataset
from reslab.engine.runs import RUN_FILES
from reslab.errors import DivergedError, UsageError
from reslab.files import atomic_write, atomic_write_text, load_state, torch_load_safe
from reslab.nn.blocks import residual_blocks
from reslab.nn.describe import count_params, forward_flops
from reslab.nn.models import build_model, channels_last_safe
from reslab.nn.normalize import Normalize
from reslab.nn.weights import load_into, read_metadata, save_weights, spec_from_metadata
from reslab.progress import Progress

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
# Resuming


def _check_resume_config(saved: dict[str, Any], cfg: TrainConfig, out: Path) -> None:
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


def _read_checkpoint(out: Path, cfg: TrainConfig) -> dict[str, Any]:
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
    _check_resume_config(saved_cfg, cfg, out)
    meta = read_metadata(out / "checkpoint" / info["weights"])
    spec = spec_from_metadata(meta, out / "checkpoint" / info["weights"])
    if spec.name != cfg.model or spec.technique != cfg.technique:
        raise UsageError(
            f"the checkpoint weights in {out} are for model {spec.name} with technique {spec.technique}, "
            f"not {cfg.model} with {cfg.technique}"
        )
    return info


# ---------------------------------------------------------------------------------------
# What a run is made of: its fixed parts (Engine) and what changes as it trains (RunState)


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
    # not validated again: the values come from the dataset and the machine
    return dataclasses.replace(cfg, **changes)


@dataclass
class Engine:
    """The fixed parts of a run, built once by :func:`_build_engine` and read by the epoch
    and evaluation functions and the callbacks."""

    cfg: TrainConfig
    d: Dist
    device: torch.device
    source: Any  # _ArraySource | _FolderSource
    #: the model itself: evaluated and saved
    raw_model: nn.Module
    #: what the training steps call: ``raw_model``, wrapped by DDP and/or torch.compile
    model: nn.Module
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    norm: Normalize
    #: a fresh autocast context (or a null one) per forward pass
    autocast: Callable[[], Any]
    steps_per_epoch: int
    #: what the saved weights carry besides the model's spec
    meta: dict[str, Any]
    params: int
    flops: int
    #: what loading ``init_weights`` did, for the progress output ("" when nothing was loaded)
    pretrained_note: str = ""

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs

    @property
    def check_every(self) -> int:
        """Steps between finiteness checks of the loss: each one syncs with the host, which
        a GPU pays for."""
        return 1 if self.device.type == "cpu" else 25

    @property
    def mid_evals(self) -> set[int]:
        """Steps (1-based, within an epoch) after which the validation set is evaluated
        besides the epoch's end."""
        k = self.cfg.evals_per_epoch
        steps = {round(j * self.steps_per_epoch / k) for j in range(1, k)}
        return steps - {0, self.steps_per_epoch}


@dataclass
class RunState:
    """What changes as a run trains; all of it goes into every checkpoint."""

    start_epoch: int = 1
    step: int = 0
    elapsed: float = 0.0
    best_acc: float = -1.0
    best_epoch: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    #: every validation (evals_per_epoch > 1 adds some inside epochs: time-to-target at sub-epoch resolution)
    evals: list[dict[str, Any]] = field(default_factory=list)

    def record_epoch(
        self, epoch: int, result: EpochResult, val_loss: float, val_acc: float, epoch_s: float
    ) -> dict[str, Any]:
        """Add a finished epoch; return its metrics.jsonl row."""
        self.elapsed += epoch_s
        row = {
            "epoch": epoch,
            "train_loss": result.loss,
            "train_acc": result.acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": result.lr,
            "epoch_s": round(epoch_s, 3),
            "elapsed_s": round(self.elapsed, 3),
            "images_per_s": round(result.images / result.train_s, 1),
        }
        self.metrics.append(row)
        self.evals.append({"epoch": epoch, "step": self.step, "val_loss": val_loss, "val_acc": val_acc})
        if val_acc > self.best_acc:
            self.best_acc, self.best_epoch = val_acc, epoch
        return row


@dataclass
class EpochResult:
    """The training half of an epoch, summed over ranks."""

    loss: float
    acc: float
    images: float
    #: seconds spent training (validations inside the epoch excluded)
    train_s: float
    #: the learning rate of the epoch's last step
    lr: float


def _set_threads(cfg: TrainConfig, d: Dist) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif d.enabled and not torch.cuda.is_available():
        # N processes on one CPU would otherwise each start a thread per core
        torch.set_num_threads(max(1, default_threads() // int(os.environ.get("LOCAL_WORLD_SIZE", d.world))))


def _open_dataset(cfg: TrainConfig) -> ArrayDataset | FolderDataset:
    try:
        ds = open_dataset(cfg.dataset, cfg.data_dir)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if isinstance(ds, FolderDataset) and cfg.image_size is not None:
        ds.image_size = (cfg.image_size, cfg.image_size)
    return ds


def _build_model(cfg: TrainConfig, ds: ArrayDataset | FolderDataset, load_init_weights: bool) -> tuple[nn.Module, str]:
    """The model, initialised from the run's seed (or ``init_weights``), on the CPU."""
    torch.manual_seed(derive_seed(cfg.seed, 0, 0))
    try:
        model = build_model(
            cfg.model,
            technique=cfg.technique,
            num_classes=ds.num_classes,
            in_channels=ds.input_size[0],
            width=cfg.width,
            drop_path_rate=cfg.drop_path_rate,
            technique_args=dict(cfg.technique_args),
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    note = ""
    if cfg.init_weights and load_init_weights:
        from reslab.nn.pretrained import load_pretrained

        note = load_pretrained(model, cfg.init_weights).summary()
    return model, note


def _restore(
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


def _wrap_for_training(model: nn.Module, cfg: TrainConfig, d: Dist, device: torch.device) -> nn.Module:
    """DDP across processes and/or torch.compile; after :func:`_restore`, since DDP hands
    rank 0's weights to the other ranks when it wraps."""
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        if device.type != "cuda":
            silence_cuda_home_warning()
        model = torch.compile(model)  # type: ignore[assignment]
    return model


def _autocast(cfg: TrainConfig, device: torch.device) -> Callable[[], Any]:
    if cfg.precision != "bf16":
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _build_engine(
    cfg: TrainConfig,
    ds: ArrayDataset | FolderDataset,
    d: Dist,
    device: torch.device,
    out: Path,
    ckpt: dict[str, Any] | None,
) -> tuple[Engine, RunState]:
    """Model, data source and optimizer of a run, and its state: fresh, or the checkpoint's."""
    c, h, w = ds.input_size
    model, note = _build_model(cfg, ds, load_init_weights=ckpt is None)  # a resumed run takes its checkpoint's
    params, flops = count_params(model), forward_flops(model, (c, h, w))
    model.to(device)
    if cfg.channels_last and not channels_last_safe(model, device):
        cfg = dataclasses.replace(cfg, channels_last=False)  # see channels_last_safe: a CPU kernel bug
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    source: Any = (_ArraySource if isinstance(ds, ArrayDataset) else _FolderSource)(ds, cfg, device, d)
    steps_per_epoch = source.n_train // cfg.batch_size
    if steps_per_epoch < 1:
        raise UsageError(
            f"batch_size {cfg.batch_size} is larger than the {source.n_train} training images; pass a smaller one"
        )
    optimizer = torch.optim.SGD(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov
    )
    state = _restore(out, ckpt, model, optimizer, device) if ckpt is not None else RunState()
    meta = {
        "input_size": [c, h, w],
        "dataset": cfg.dataset,
        "classes": list(ds.classes),
        "mean": list(ds.mean),
        "std": list(ds.std),
    }
    engine = Engine(
        cfg=cfg,
        d=d,
        device=device,
        source=source,
        raw_model=model,
        model=_wrap_for_training(model, cfg, d, device),
        optimizer=optimizer,
        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
        norm=Normalize(ds.mean, ds.std, device),
        autocast=_autocast(cfg, device),
        steps_per_epoch=steps_per_epoch,
        meta=meta,
        params=params,
        flops=flops,
        pretrained_note=note,
    )
    return engine, state


def _initial_summary(e: Engine, state: RunState) -> dict[str, Any]:
    """summary.json of a run that is starting (or resuming)."""
    cfg = e.cfg
    return {
        "status": "running",
        "model": cfg.model,
        "technique": cfg.technique,
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "epochs_completed": state.start_epoch - 1,
        "best_val_acc": state.best_acc if state.best_epoch else None,
        "best_epoch": state.best_epoch or None,
        "test_acc": None,
        "test_loss": None,
        "elapsed_s": state.elapsed,
        "params": e.params,
        "flops": e.flops,
        "val_source": "val" if cfg.val_size else "test",
        "chance_acc": e.source.chance_acc,
        "world_size": e.d.world,
        "device": str(e.device),
        # who is training it: a later run tells a live run from one whose process is gone
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }


# ---------------------------------------------------------------------------------------
# The engine: orchestration, one epoch, evaluation


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
    d = _setup_distributed(
        config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    _set_threads(config, d)
    resume, overwrite = runs.plan_run(out, config, resume, overwrite)  # before touching anything
    d.barrier()  # every rank has looked at out_dir before rank 0 writes to it
    device = _resolve_device(config, d)
    ds = _open_dataset(config)
    cfg = resolve_config(config, ds, device)
    if cfg.batch_size % d.world:
        raise UsageError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({d.world})")
    ckpt = _read_checkpoint(out, cfg) if resume else None
    engine, state = _build_engine(cfg, ds, d, device, out, ckpt)
    summary = _initial_summary(engine, state)
    callbacks = _callbacks(engine, state, summary, out, overwrite and not resume, progress, on_epoch)
    epoch = state.start_epoch
    try:
        for epoch in range(state.start_epoch, engine.cfg.epochs + 1):
            t0 = time.perf_counter()
            result = train_one_epoch(engine, state, epoch, callbacks)
            if result is None:
                summary.update(status="diverged", diverged_epoch=epoch, epochs_completed=epoch - 1)
                summary["elapsed_s"] = state.elapsed + time.perf_counter() - t0
                _run_end(callbacks, summary)
                return summary
            val_loss, val_acc = evaluate(engine, "val")
            row = state.record_epoch(epoch, result, val_loss, val_acc, time.perf_counter() - t0)
            summary.update(epochs_completed=epoch, best_val_acc=state.best_acc, best_epoch=state.best_epoch)
            summary.update(elapsed_s=round(state.elapsed, 3))
            for cb in callbacks:
                cb.on_epoch_end(row)
        test_loss, test_acc = evaluate(engine, "test")
        _run_end(callbacks, summary, status="completed", test_acc=test_acc, test_loss=test_loss)
        d.barrier()
        return summary
    except KeyboardInterrupt:
        _run_end(callbacks, summary, status="interrupted", interrupted_epoch=epoch)
        raise
    except Exception as e:
        # out of memory or any other stop: say so, so that the next run knows what it finds
        _run_end(callbacks, summary, status="failed", failed_epoch=epoch, error=f"{type(e).__name__}: {str(e)[:300]}")
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
        with e.autocast():
            logits = e.model(x)
            loss = e.criterion(logits.float(), yb)
        e.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.step += 1
        for cb in callbacks:
            cb.on_backward(state.step, epoch)
        if ((i + 1) % e.check_every == 0 or i + 1 == e.steps_per_epoch) and not _finite(d, loss.item()):
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
    if not _finite(d, float(loss_sum)):
        return None
    train_s = time.perf_counter() - t0 - eval_time
    n = torch.tensor(float(seen), dtype=torch.float64, device=e.device)
    totals = d.all_sum(torch.stack([loss_sum, correct, n]))
    return EpochResult(
        float(totals[0]) / float(totals[2]), float(totals[1]) / float(totals[2]), float(totals[2]), train_s, lr
    )


def epoch_draws(cfg: TrainConfig, epoch: int, n: int) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """The epoch's data order and augmentation (crop offsets, flips), all from ``(seed, epoch)``."""
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, 1))
    order = torch.randperm(n, generator=g)
    pad = cfg.crop_padding or 0
    dy = torch.randint(-pad, pad + 1, (n,), generator=g)
    dx = torch.randint(-pad, pad + 1, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5 if cfg.flip else torch.zeros(n, dtype=torch.bool)
    return order, (dy, dx, flip)


def _finite(d: Dist, value: float) -> bool:
    """Whether ``value`` is finite on every rank (all ranks stop together)."""
    bad = torch.tensor(0.0 if math.isfinite(value) else 1.0)
    return d.all_sum(bad).item() == 0


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


def _block_grad_norms(blocks: list[tuple[str, nn.Module]]) -> list[float]:
    norms = []
    for _, b in blocks:
        grads = [p.grad for p in b.parameters() if p.grad is not None]
        if grads:
            norms.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
        else:
            norms.append(torch.zeros((), device=next(b.parameters()).device))
    return torch.stack(norms).float().cpu().tolist()


# ---------------------------------------------------------------------------------------
# Callbacks: the jobs around the loop, each told what happened


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


def _run_end(callbacks: Sequence[Callback], summary: dict[str, Any], **changes: Any) -> None:
    summary.update(changes)
    for cb in callbacks:
        cb.on_run_end(summary)


def _callbacks(
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
        _save_checkpoint(self.out, self.e, self.state, epoch)
        if self.state.best_epoch == epoch:  # the best-validation weights, kept beside the final ones
            best_meta = {**self.e.meta, "epoch": epoch, "val_acc": row["val_acc"]}
            save_weights(self.out / "model-best.safetensors", self.e.raw_model, extra=best_meta)
        self._write_records()

    def on_run_end(self, summary: dict[str, Any]) -> None:
        if summary["status"] == "completed":
            save_weights(self.out / "model.safetensors", self.e.raw_model, extra=self.e.meta)
        runs.write_json(self.out / "summary.json", summary)


def _save_checkpoint(out: Path, e: Engine, state: RunState, epoch: int) -> None:
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
            norms = _block_grad_norms(self.blocks)
            rec = {"step": step, "epoch": epoch, **{name: v for (name, _), v in zip(self.blocks, norms, strict=True)}}
            self.file.write(json.dumps(rec) + "\n")

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
