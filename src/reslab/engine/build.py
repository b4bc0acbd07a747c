"""Building a run from its config: the resolved config, the dataset, the model (from the
seed or initial weights), its training wrappers, and the :class:`~reslab.engine.state.Engine`
and :class:`~reslab.engine.state.RunState` the loop reads."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reslab.engine.checkpoint import restore
from reslab.engine.config import TrainConfig, default_threads
from reslab.engine.data import ArrayDataset, FolderDataset, open_dataset
from reslab.engine.devices import autocast_factory, pick_precision
from reslab.engine.distributed import Dist
from reslab.engine.graphed import GraphedStep, graphs_refusal
from reslab.engine.optim import param_groups
from reslab.engine.sources import DEFAULT_VAL_SIZE, ArraySource, FolderSource, derive_seed
from reslab.engine.state import Engine, RunState
from reslab.errors import UsageError
from reslab.nn.describe import count_params, forward_flops
from reslab.nn.models import build_model, channels_last_safe
from reslab.nn.normalize import Normalize


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
        changes["precision"] = pick_precision(cfg.precision, device)
    # not validated again: the values come from the dataset and the machine
    return dataclasses.replace(cfg, **changes)


def set_threads(cfg: TrainConfig, d: Dist) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif d.enabled and not torch.cuda.is_available():
        # N processes on one CPU would otherwise each start a thread per core
        torch.set_num_threads(max(1, default_threads() // int(os.environ.get("LOCAL_WORLD_SIZE", d.world))))


def open_run_dataset(cfg: TrainConfig) -> ArrayDataset | FolderDataset:
    try:
        ds = open_dataset(cfg.dataset, cfg.data_dir)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if isinstance(ds, FolderDataset) and cfg.image_size is not None:
        ds.image_size = (cfg.image_size, cfg.image_size)
    return ds


def build_run_model(
    cfg: TrainConfig, ds: ArrayDataset | FolderDataset, load_init_weights: bool
) -> tuple[nn.Module, str]:
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


def wrap_for_training(model: nn.Module, cfg: TrainConfig, d: Dist, device: torch.device) -> nn.Module:
    """DDP across processes and/or torch.compile; after :func:`restore`, since DDP hands
    rank 0's weights to the other ranks when it wraps."""
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        if device.type != "cuda":
            silence_cuda_home_warning()
        model = torch.compile(model)  # type: ignore[assignment]
    return model


def autocast_for(cfg: TrainConfig, device: torch.device) -> Callable[..., Any]:
    """The run's autocast factory (:func:`~reslab.engine.devices.autocast_factory` for its
    resolved precision)."""
    return autocast_factory(cfg.precision, device)


def build_engine(
    cfg: TrainConfig,
    ds: ArrayDataset | FolderDataset,
    d: Dist,
    device: torch.device,
    out: Path,
    ckpt: dict[str, Any] | None,
    source: Any = None,
) -> tuple[Engine, RunState]:
    """Model, data source and optimizer of a run, and its state: fresh, or the checkpoint's.

    ``source``: a data source built for another run of the same data (the members of a
    pack share one), instead of a new one."""
    c, h, w = ds.input_size
    model, note = build_run_model(cfg, ds, load_init_weights=ckpt is None)  # a resumed run takes its checkpoint's
    params, flops = count_params(model), forward_flops(model, (c, h, w))
    model.to(device)
    if cfg.channels_last and not channels_last_safe(model, device):
        cfg = dataclasses.replace(cfg, channels_last=False)  # see channels_last_safe: a CPU kernel bug
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if source is None:
        source = (ArraySource if isinstance(ds, ArrayDataset) else FolderSource)(ds, cfg, device, d)
    steps_per_epoch = source.n_train // cfg.batch_size
    if steps_per_epoch < 1:
        raise UsageError(
            f"batch_size {cfg.batch_size} is larger than the {source.n_train} training images; pass a smaller one"
        )
    if cfg.cuda_graphs and (why := graphs_refusal(device, d.enabled, cfg.compile, cfg.probe_every, model)):
        raise UsageError(f"cuda_graphs: {why}; or train without cuda_graphs")
    optimizer = torch.optim.SGD(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov
    )
    state = restore(out, ckpt, model, optimizer, device) if ckpt is not None else RunState()
    meta = {
        "input_size": [c, h, w],
        "dataset": cfg.dataset,
        "classes": list(ds.classes),
        "mean": list(ds.mean),
        "std": list(ds.std),
    }
    autocast = autocast_for(cfg, device)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    engine = Engine(
        cfg=cfg,
        d=d,
        device=device,
        source=source,
        raw_model=model,
        model=wrap_for_training(model, cfg, d, device),
        optimizer=optimizer,
        criterion=criterion,
        norm=Normalize(ds.mean, ds.std, device),
        autocast=autocast,
        steps_per_epoch=steps_per_epoch,
        meta=meta,
        params=params,
        flops=flops,
        pretrained_note=note,
        graphed=GraphedStep(model, criterion, optimizer, autocast) if cfg.cuda_graphs else None,
    )
    return engine, state


def initial_summary(e: Engine, state: RunState) -> dict[str, Any]:
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
