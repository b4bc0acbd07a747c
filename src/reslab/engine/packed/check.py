"""What may train as one pack: runs that differ only in their seed, with a model that packs
by one of the two routes (:func:`pack_route`, tried on the model itself rather than on a
list)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from reslab.caches import cache_key, new_cache
from reslab.engine.build import build_run_model
from reslab.engine.config import TrainConfig
from reslab.errors import UsageError
from reslab.nn.registry import technique_class

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


#: how close a pack's forward pass and gradients must come to its members' run alone, on
#: the CPU in float64. Rounding differs between kernels, and a deep net amplifies it: in
#: float32 a resnet110 with fusion moved its logits by 0.15 of 1.1 between the grouped and
#: the plain convolutions, in float64 by 6e-9. A wrong layout differs by O(1).
FORWARD_RTOL = 1e-6
GRAD_RTOL = 1e-4


def pack_route(cfg: TrainConfig, ds: Any) -> tuple[str, str]:
    """How ``cfg``'s model trains packed: ``("grouped", "")`` where it has a grouped form
    (:mod:`.grouped`) that computes what its members compute alone, else ``("vmap", "")``
    where ``vmap`` maps it and computes the same, else ``("", why)``.

    Tried on the model itself, without DropPath (whose draws differ by design): two members
    with different weights, on the CPU in float64, one training step on four random images
    each (logits within :data:`FORWARD_RTOL` of the members alone, the gradients within
    :data:`GRAD_RTOL` in norm) and one evaluation pass. Float32 or bf16 members may still
    train packed: the check is of the layout, not of the precision."""
    routes, why = pack_routes(cfg, ds, first_only=True)
    return (routes[0], "") if routes else ("", why)


def pack_routes(cfg: TrainConfig, ds: Any, first_only: bool = False) -> tuple[list[str], str]:
    """Every route by which ``cfg``'s model packs correctly, in order of preference (grouped,
    vmap), checked as :func:`pack_route` says (``first_only``: stop at the first), and why
    none does ("" when one does): where both do, a GPU chooses between them by measurement
    (:func:`reslab.engine.packed.speed.pick_route`). Checked once per process for the same
    settings and technique class: a grid's probes and packs ask again and again."""
    # DropPath's draws differ between a pack and its members alone by design; both routes
    # pack it with a module of their own, so the comparison is made without it
    cfg = dataclasses.replace(cfg, drop_path_rate=0.0)
    settings = {n: v for n, v in cfg.to_dict().items() if n not in ("seed", "pack")}
    key = cache_key([settings, id(technique_class(cfg.technique)), list(ds.input_size), ds.num_classes, first_only])
    if key not in _ROUTES_CHECKED:
        _ROUTES_CHECKED[key] = _check_routes(cfg, ds, first_only)
    routes, why = _ROUTES_CHECKED[key]
    return list(routes), why


#: pack_routes's answers, by settings and technique class
_ROUTES_CHECKED: dict[str, tuple[list[str], str]] = new_cache("packing.routes_checked")


def _check_routes(cfg: TrainConfig, ds: Any, first_only: bool) -> tuple[list[str], str]:
    """:func:`pack_routes`'s check itself."""
    from reslab.engine.packed.grouped import NotGroupable

    state = torch.random.get_rng_state()
    try:
        members = _members(cfg, ds)
        c, h, w = ds.input_size
        x, y = torch.randn(2, 4, c, h, w, dtype=torch.float64), torch.randint(0, ds.num_classes, (2, 4))
        want = _alone(members, x, y, cfg.label_smoothing)
        why, ok = {}, []
        for route in ("grouped", "vmap"):
            try:
                _check_route(cfg, members, route, x, y, want)
                ok.append(route)
                if first_only:
                    break
            except NotGroupable as e:
                why[route] = f"no grouped form: {e}"
            except Exception as e:  # noqa: BLE001 -- whatever a route refuses, the runs still train (alone)
                why[route] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return ok, "" if ok else why["vmap"]
    finally:
        torch.random.set_rng_state(state)


def packable(cfg: TrainConfig, ds: Any) -> str:
    """Why ``cfg``'s model cannot train packed ("" when it can, by either route)."""
    return pack_route(cfg, ds)[1]


def _members(cfg: TrainConfig, ds: Any) -> list[torch.nn.Module]:
    """Two members of the pack, their weights moved off their init (whose zeros, as in
    skipinit or Fixup, would hide a wrong merge)."""
    models = []
    for _ in range(2):
        m, _note = build_run_model(cfg, ds, load_init_weights=False)
        m = m.double()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p), alpha=0.05)
        models.append(m)
    return models


def _alone(
    members: Sequence[torch.nn.Module], x: torch.Tensor, y: torch.Tensor, smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The members' training logits (K x B x classes) and their gradients, one flat vector."""
    logits, grads = [], []
    for i, m in enumerate(members):
        m = copy.deepcopy(m).train()
        out = m(x[i])
        F.cross_entropy(out, y[i], label_smoothing=smoothing).backward()
        logits.append(out.detach())
        grads += [torch.zeros(p.numel(), dtype=p.dtype) if p.grad is None else p.grad.flatten() for p in m.parameters()]
    return torch.stack(logits), torch.cat(grads)


def _check_route(
    cfg: TrainConfig,
    members: Sequence[torch.nn.Module],
    route: str,
    x: torch.Tensor,
    y: torch.Tensor,
    want: tuple[torch.Tensor, torch.Tensor],
) -> None:
    """Raise unless a pack of ``members`` by ``route`` trains and evaluates as they do alone."""
    from reslab.engine.packed.stack import PackedModel

    models = [copy.deepcopy(m) for m in members]
    opts = [torch.optim.SGD(m.parameters(), lr=cfg.lr) for m in models]
    pack = PackedModel(models, opts, cfg.weight_decay, cfg.momentum, cfg.nesterov, cfg.lr, route=route)
    losses, logits = pack.train_losses(x, y, cfg.label_smoothing)
    pack.optimizer.zero_grad(set_to_none=False)
    losses.sum().backward()
    names = [n for n, _ in members[0].named_parameters()]
    got = torch.cat([pack.params[n].grad[i].flatten() for i in range(len(models)) for n in names])
    want_logits, want_grads = want
    if not torch.allclose(logits.detach(), want_logits, rtol=FORWARD_RTOL, atol=FORWARD_RTOL):
        raise ValueError(f"the {route} pack's logits differ from its members' alone")
    if (got - want_grads).norm() > GRAD_RTOL * want_grads.norm():
        raise ValueError(f"the {route} pack's gradients differ from its members' alone")
    pack.step()
    with torch.inference_mode():
        pack.eval_logits(x[0])


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
