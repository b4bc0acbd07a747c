"""What may train as one pack: runs that differ only in their seed, with a technique that
``vmap`` can map (:func:`packable`, tried on the model itself rather than on a list)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from reslab.engine.build import build_run_model
from reslab.engine.config import TrainConfig
from reslab.errors import UsageError

#: fields in which the runs of one pack may differ (where they run, not what they compute)
FREE = frozenset({"seed", "pack", "threads", "tensorboard", "workers"})


def check_pack(configs: Sequence[TrainConfig], outs: Sequence[Path]) -> None:
    """A :class:`UsageError` unless ``configs`` can train as one pack into ``outs``."""
    if not configs:
        raise UsageError("a pack needs at least one run")
    if len(configs) != len(outs):
        raise UsageError(f"a pack of {len(configs)} configs needs as many run folders, got {len(outs)}")
    if len({p.resolve() for p in outs}) != len(outs):
        raise UsageError("the runs of a pack need a run folder each; two of them share one")
    seeds = [c.seed for c in configs]
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"the runs of a pack need distinct seeds, got {seeds}")
    first = {k: v for k, v in configs[0].to_dict().items() if k not in FREE}
    for c in configs[1:]:
        now = {k: v for k, v in c.to_dict().items() if k not in FREE}
        diff = sorted(k for k in first.keys() | now.keys() if first.get(k) != now.get(k))
        if diff:
            shown = ", ".join(f"{k}={first.get(k)!r} vs {now.get(k)!r}" for k in diff)
            raise UsageError(
                f"the runs of a pack may differ only in their seed; seed {c.seed} differs in {shown}: "
                "train them in separate packs"
            )
    c = configs[0]
    if c.compile:
        raise UsageError("a pack does not torch.compile its model yet; train it without compile")
    if c.probe_every:
        raise UsageError("the gradient-norm probe (probe_every) is not recorded in a pack; train these runs alone")


def packable(cfg: TrainConfig, ds: Any) -> str:
    """Why ``cfg``'s model cannot be mapped over a pack ("" when it can): one training and
    one evaluation pass of a pack of two on two images, on the CPU, in float32."""
    from reslab.engine.packed.stack import PackedModel

    state = torch.random.get_rng_state()
    try:
        models, opts = [], []
        for _ in range(2):
            m, _note = build_run_model(cfg, ds, load_init_weights=False)
            models.append(m)
            opts.append(torch.optim.SGD(m.parameters(), lr=cfg.lr))
        pack = PackedModel(models, opts, cfg.weight_decay, cfg.momentum, cfg.nesterov, cfg.lr)
        c, h, w = ds.input_size
        losses, _ = pack.train_losses(torch.zeros(2, 2, c, h, w), torch.zeros(2, 2, dtype=torch.long), 0.0)
        losses.sum().backward()
        pack.step()
        with torch.inference_mode():
            pack.eval_logits(torch.zeros(2, c, h, w))
    except Exception as e:  # noqa: BLE001 -- whatever vmap refuses, the runs still train (alone)
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    finally:
        torch.random.set_rng_state(state)
    return ""


def pack_groups(configs: Sequence[TrainConfig], size: int) -> list[list[int]]:
    """The indices of ``configs`` in packs of at most ``size`` runs that may train together
    (the same settings but their seed), in the order the configs come: what a scheduler
    hands :func:`~reslab.engine.packed.loop.train_pack` one list at a time."""
    if size < 1:
        raise UsageError(f"a pack holds at least 1 run, got {size}")
    groups: dict[str, list[list[int]]] = {}
    order: list[list[int]] = []
    for i, c in enumerate(configs):
        key = repr(sorted((k, repr(v)) for k, v in c.to_dict().items() if k not in FREE))
        packs = groups.setdefault(key, [])
        if not packs or len(packs[-1]) == size or any(configs[j].seed == c.seed for j in packs[-1]):
            packs.append([])
            order.append(packs[-1])
        packs[-1].append(i)
    return order
