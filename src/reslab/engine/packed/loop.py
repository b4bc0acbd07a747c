"""The packed loop: :func:`train_pack` trains K runs that differ only in their seed as one
:class:`~reslab.engine.packed.stack.PackedModel`, and writes each run's folder exactly as
:func:`reslab.engine.train.train` would.

Each member is built by the engine's own :func:`~reslab.engine.build.build_engine` (its
model initialised from its seed, its optimizer, its checkpoint when resuming) and keeps
its own :class:`~reslab.engine.state.RunState`, summary and callbacks (run folder,
checkpoints, TensorBoard); only the training steps and evaluations run packed. Per step,
member ``i`` trains on its own batch, drawn from its own ``(seed, epoch)`` order and
augmentation (:func:`~reslab.engine.sources.epoch_draws`), with the learning rate
:func:`~reslab.engine.optim.lr_at` gives alone.

What differs from alone: in-model randomness (DropPath) is drawn per member from one
stream of the pack, seeded by ``(epoch, the pack's seeds)``, not from the member's own
``(seed, epoch)``; it is as reproducible, and resume is as exact, but a run with
``drop_path_rate > 0`` packed is not bit for bit the run alone. Numerically a packed step
is the same computation through other kernels (grouped convolutions), so losses agree with
the run alone to rounding (1e-5 relative or closer in the tests), not bit for bit.

Divergence: a member whose loss turns non-finite is frozen (:meth:`PackedModel.freeze`)
and recorded ``diverged`` with its epoch, exactly as alone; the other members go on, and
since members never mix, their results are what they would have been without it. Losses
are checked every :attr:`~reslab.engine.state.Engine.check_every` steps (each check syncs
with the host): on the CPU every step, so a member freezes at its last good state; on a GPU
it may take up to 24 more steps, in which its weights (never saved again) turn non-finite.

Resume (``resume=True``): every member reads its own checkpoint. Members whose folders
say ``completed`` or ``diverged`` are left as they are; the others must stand at the same
epoch (a member with no checkpoint stands at 0) and continue as one pack, else a
:class:`~reslab.errors.UsageError` names each member's epoch. A pack that resumes without
its finished members is smaller, so it continues to rounding, not bit for bit, as it
would have gone on uninterrupted (and with ``drop_path_rate > 0`` its draws differ); with
all its members it continues exactly. A member's checkpoint is the
one a run alone writes, so such a member can always be resumed alone with
``train(config, out, resume=True)``, and a run started alone can join a pack.

CUDA graphs (``cuda_graphs``, on a CUDA device): the pack's whole step, the members' SGD
update included, is captured once as one graph and replayed
(:class:`~reslab.engine.packed.graphed.GraphedPackStep`: three eager warm-up steps, then the
capture), each member's learning rate written into a device vector before every replay. It
trains each member as the eager pack does, to rounding; a member whose loss turns
non-finite is frozen after that step's update rather than before it (never saved again, so
recorded the same), and the graph is captured again without it. Checkpoints hold each
member's momentum as the eager pack's do, so resume (kill -9 included) is as exact. The
pack says its start-up once (build, warm-up, capture, first step) and keeps it in every
member's summary (``pack_startup_s``). Refused, in one line, on the CPU, under torchrun,
with ``compile`` and with ``probe_every`` (the last two as for any pack).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from reslab.engine import runs
from reslab.engine.build import build_engine, initial_summary, open_run_dataset, resolve_config, set_threads
from reslab.engine.callbacks import Callback, default_callbacks, run_end
from reslab.engine.checkpoint import read_checkpoint
from reslab.engine.config import TrainConfig
from reslab.engine.devices import device_name
from reslab.engine.distributed import resolve_device, setup_distributed
from reslab.engine.optim import lr_at
from reslab.engine.packed.check import check_pack, pack_routes
from reslab.engine.packed.graphed import GraphedPackStep, pack_graphs_refusal
from reslab.engine.packed.speed import fastest_route
from reslab.engine.packed.stack import PackedModel
from reslab.engine.sources import augment_gather, derive_seed, epoch_draws
from reslab.engine.state import Engine, EpochResult, RunState
from reslab.errors import UsageError
from reslab.progress import Progress

#: called with the step (1-based) and the members' losses (a K-vector) before the backward
#: pass; returns the losses to use. For fault injection in tests.
LossHook = Callable[[int, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class Member:
    """One run of the pack: its engine (model, optimizer, source), state, summary, callbacks."""

    out: Path
    engine: Engine
    state: RunState
    summary: dict[str, Any]
    callbacks: list[Callback]
    alive: bool = True


def train_pack(
    configs: Sequence[TrainConfig],
    out_dirs: Sequence[str | Path],
    *,
    resume: bool | Sequence[bool] = False,
    overwrite: bool | Sequence[bool] = False,
    progress: bool | None = None,
    loss_hook: LossHook | None = None,
    graph_capture: bool = True,
) -> list[dict[str, Any]]:
    """Train the runs ``configs`` (which differ only in ``seed``) into ``out_dirs`` as one
    pack; return each run's summary.json content, in order.

    Every run folder is the one :func:`reslab.engine.train.train` writes, its config
    recording the pack (``pack: {size, index, members, seeds}``). ``resume``/``overwrite``
    apply to each folder as in ``train`` (one flag for all, or one per run). The pack takes a
    route :func:`~reslab.engine.packed.check.pack_routes` finds correct (grouped layers, else
    ``vmap``; on a GPU where both are, the faster in a short measurement,
    :func:`~reslab.engine.packed.speed.fastest_route`; the config's ``pack`` records it); a
    model neither route can pack is said so on stderr and its runs train one after another
    with ``train``. ``progress``: ``False`` = silent, otherwise one line
    per epoch of the pack.

    With ``cuda_graphs`` the pack's step is captured as a CUDA graph and replayed
    (:mod:`~reslab.engine.packed.graphed`), on a CUDA device only; ``graph_capture=False`` runs
    the graphed step's arithmetic eagerly instead, on any device (for tests on the CPU).
    """
    from reslab.engine.train import train

    started = time.perf_counter()
    configs = [c.ensure_valid() for c in configs]
    outs = [Path(o) for o in out_dirs]
    check_pack(configs, outs)
    resumes, overwrites = _per_run(resume, len(outs), "resume"), _per_run(overwrite, len(outs), "overwrite")
    say = Progress("pack", enabled=progress is not False, bar=False)
    d = setup_distributed(device_name(configs[0].device))
    if d.enabled:
        raise UsageError("a pack trains in one process; run it without torchrun")
    set_threads(configs[0], d)
    ds = open_run_dataset(configs[0])
    device = resolve_device(configs[0], d)
    c0 = configs[0]
    if c0.cuda_graphs and (
        why := pack_graphs_refusal(device, d.enabled, c0.compile, c0.probe_every, None, graph_capture)
    ):
        raise UsageError(f"cuda_graphs: {why}; or train the pack without cuda_graphs")
    # on a GPU both correct routes are candidates, the faster taken; elsewhere the first
    routes, why = pack_routes(configs[0], ds, first_only=device.type != "cuda")
    if why:
        say.line(f"technique {configs[0].technique!r} cannot train packed ({why}); training its runs one at a time")
        return [
            train(c, o, resume=r, overwrite=w, progress=False)
            for c, o, r, w in zip(configs, outs, resumes, overwrites, strict=True)
        ]
    with runs.locked(outs):  # every member's folder, for the whole pack
        return _train_pack(
            configs, outs, resumes, overwrites, ds, device, d, routes, say, loss_hook, graph_capture, started
        )


def _train_pack(
    configs: list[TrainConfig],
    outs: list[Path],
    resumes: list[bool],
    overwrites: list[bool],
    ds: Any,
    device: torch.device,
    d: Any,
    routes: Sequence[str],
    say: Progress,
    loss_hook: LossHook | None,
    graph_capture: bool,
    started: float,
) -> list[dict[str, Any]]:
    """:func:`train_pack` once its folders are locked: plan, build the members, train them."""
    plans = [runs.plan_run(o, c, r, w) for c, o, r, w in zip(configs, outs, resumes, overwrites, strict=True)]
    route, rates = fastest_route(configs[0], ds, device, len(configs), routes)
    if rates:
        measured = ", ".join(f"{r} {rates[r]:,.0f} img/s" if r in rates else f"{r} out of memory" for r in routes)
        say.line(f"pack route by measurement on {device}: {measured}; {route} taken")
    names, seeds = [o.name for o in outs], [c.seed for c in configs]
    members: list[Member] = []
    finished: dict[int, dict[str, Any]] = {}
    source = None
    for i, (c, o, (res, ow)) in enumerate(zip(configs, outs, plans, strict=True)):
        if res and runs.run_state(o) in ("completed", "diverged"):
            finished[i] = runs.read_summary(o) or {}  # a resumed pack leaves finished members as they are
            continue
        pack = {"size": len(configs), "index": i, "members": names, "seeds": seeds, "route": route}
        # one process; the members' own modules never run a step, so their layout is moot
        cfg = dataclasses.replace(resolve_config(c, ds, device), channels_last=False, pack=pack)
        ckpt = read_checkpoint(o, cfg) if res else None
        # the pack replays a graph of its own (.graphed): a member's engine never steps, so it is
        # built without one (and without a run's refusal of the CPU), its config still saying cuda_graphs
        engine, state = build_engine(dataclasses.replace(cfg, cuda_graphs=False), ds, d, device, o, ckpt, source)
        engine.cfg = dataclasses.replace(engine.cfg, cuda_graphs=cfg.cuda_graphs)
        if (
            cfg.cuda_graphs
            and not members
            and (why := pack_graphs_refusal(device, False, False, 0, engine.raw_model, graph_capture))
        ):
            raise UsageError(f"cuda_graphs: {why}; or train the pack without cuda_graphs")
        source = engine.source  # the members share one copy of the data
        summary = initial_summary(engine, state)
        summary["pack_size"] = len(configs)  # its elapsed_s is the pack's time, shared by pack_size runs
        cbs = default_callbacks(engine, state, summary, o, ow and not res, False, None)
        members.append(Member(o, engine, state, summary, cbs))
    if members:
        starts = {m.state.start_epoch for m in members}
        if len(starts) > 1:
            for m in members:
                for cb in m.callbacks:
                    cb.close()
            at = ", ".join(f"{m.out.name} at epoch {m.state.start_epoch - 1}" for m in members)
            raise UsageError(
                f"the pack's runs stand at different epochs ({at}); a pack resumes only from one epoch: resume "
                "each run alone (train(config, out, resume=True)) or pack the runs that stand together"
            )
        _run(members, say, loss_hook, route, graph_capture, started)
    by_out = {m.out: m.summary for m in members}
    return [finished[i] if i in finished else by_out[o] for i, o in enumerate(outs)]


def _per_run(flag: bool | Sequence[bool], n: int, name: str) -> list[bool]:
    if isinstance(flag, bool):
        return [flag] * n
    flags = [bool(f) for f in flag]
    if len(flags) != n:
        raise UsageError(f"{name} needs one flag per run of the pack ({n}), got {len(flags)}")
    return flags


def _run(
    members: list[Member], say: Progress, loss_hook: LossHook | None, route: str, capture: bool, started: float
) -> None:
    e0 = members[0].engine
    cfg = e0.cfg
    pack = PackedModel(
        [m.engine.raw_model for m in members],
        [m.engine.optimizer for m in members],
        cfg.weight_decay,
        cfg.momentum,
        cfg.nesterov,
        cfg.lr,
        route=route,
        channels_last=e0.device.type == "cuda",  # grouped convolutions are fastest so on a GPU
    )
    graphed = _graphed_step(members, pack, say, loss_hook, capture, started) if cfg.cuda_graphs else None
    say.line(
        f"training {len(members)} runs of {cfg.model} ({cfg.technique}) packed ({route}"
        f"{', CUDA graph' if graphed is not None else ''}), seeds "
        f"{', '.join(str(m.engine.cfg.seed) for m in members)}: {e0.source.n_train} images, "
        f"{e0.steps_per_epoch} steps/epoch, {cfg.epochs} epochs, device {e0.device}"
    )
    start = epoch = members[0].state.start_epoch
    try:
        for epoch in range(start, cfg.epochs + 1):
            t0 = time.perf_counter()
            results = _train_epoch(members, pack, epoch, loss_hook, graphed)
            val = _evaluate(members, pack, "val")
            epoch_s = time.perf_counter() - t0
            alive = []
            for i, m in enumerate(members):
                if not m.alive:
                    continue
                r = results[i]
                if r is None:
                    _diverge(m, pack, i, epoch, epoch_s)
                    continue
                alive.append(i)
                m.state.record_epoch(epoch, r, val[i][0], val[i][1], epoch_s)
                m.summary.update(epochs_completed=epoch, best_val_acc=m.state.best_acc, best_epoch=m.state.best_epoch)
                m.summary.update(elapsed_s=round(m.state.elapsed, 3))
            pack.to_members(alive)
            for i in alive:
                for cb in members[i].callbacks:
                    cb.on_epoch_end(members[i].state.metrics[-1])
            if not alive:
                return
            accs = " ".join(f"{val[i][1]:.4f}" for i in alive)
            say.line(f"epoch {epoch}/{cfg.epochs}  val_acc {accs}  {epoch_s:.1f}s")
        test = _test_results(members, pack)
        for i, m in enumerate(members):
            if m.alive:
                run_end(m.callbacks, m.summary, status="completed", test_acc=test[i][1], test_loss=test[i][0])
    except KeyboardInterrupt:
        for m in members:
            if m.alive:
                run_end(m.callbacks, m.summary, status="interrupted", interrupted_epoch=epoch)
        raise
    except Exception as exc:
        for m in members:
            if m.alive:
                error = f"{type(exc).__name__}: {str(exc)[:300]}"
                run_end(m.callbacks, m.summary, status="failed", failed_epoch=epoch, error=error)
        raise
    finally:
        for m in members:
            for cb in m.callbacks:
                cb.close()


def _graphed_step(
    members: list[Member], pack: PackedModel, say: Progress, loss_hook: LossHook | None, capture: bool, started: float
) -> GraphedPackStep:
    """The pack's graphed step; its start-up (build, warm-up, capture, first step) is said
    once, after the first replay, and kept in every member's summary (``pack_startup_s``).
    ``loss_hook`` gets the step's number as in the eager loop."""
    built = time.perf_counter() - started
    state0 = members[0].state

    def said(t: dict[str, float]) -> None:
        total = built + t["warmup_s"] + t["capture_s"] + t["first_step_s"]
        parts = {"build": built, "warmup": t["warmup_s"], "capture": t["capture_s"], "first_step": t["first_step_s"]}
        for m in members:
            m.summary["pack_startup_s"] = {k: round(v, 3) for k, v in {**parts, "total": total}.items()}
        say.line(
            f"pack start-up {total:.1f} s: build {built:.1f} s, warm-up {t['warmup_s']:.1f} s "
            f"({t['warmup_steps']:.0f} eager steps), capture {t['capture_s']:.2f} s, first step "
            f"{t['first_step_s']:.2f} s" + ("" if capture else " (the graph's work run eagerly, not captured)")
        )

    e0 = members[0].engine
    hook = None if loss_hook is None else (lambda losses: loss_hook(state0.step + 1, losses))
    return GraphedPackStep(pack, e0.autocast, e0.cfg.label_smoothing, capture, hook, said)


def _diverge(m: Member, pack: PackedModel, i: int, epoch: int, epoch_s: float) -> None:
    """Record member ``i`` as a run alone records a divergence: its earlier epochs kept, no weights."""
    pack.freeze(i)
    m.alive = False
    m.summary.update(status="diverged", diverged_epoch=epoch, epochs_completed=epoch - 1)
    m.summary["elapsed_s"] = m.state.elapsed + epoch_s
    run_end(m.callbacks, m.summary)


def _train_epoch(
    members: list[Member],
    pack: PackedModel,
    epoch: int,
    loss_hook: LossHook | None,
    graphed: GraphedPackStep | None = None,
) -> list[EpochResult | None]:
    """Train epoch ``epoch`` of every live member; per member its result, or ``None`` when
    its loss became non-finite in this epoch (it is frozen from that step on). ``graphed``:
    each step is that replayed graph (which calls ``loss_hook`` itself)."""
    e0 = members[0].engine
    cfg, k = e0.cfg, len(members)
    t0 = time.perf_counter()
    draws = [epoch_draws(m.engine.cfg, epoch, e0.source.n_train) for m in members]
    # in-model randomness (DropPath): one stream for the pack per epoch, so resume is exact
    torch.manual_seed(derive_seed(epoch, 2, *(cfg.pack or {}).get("seeds", [])))
    its = [e0.source.train_batches(order, aug, cfg.batch_size, e0.steps_per_epoch) for order, aug in draws]
    loss_sum = torch.zeros(k, dtype=torch.float64, device=e0.device)
    correct = torch.zeros(k, dtype=torch.float64, device=e0.device)
    failed = [not m.alive for m in members]
    newly: set[int] = set()
    seen, eval_time, lr, pad = 0, 0.0, cfg.lr, cfg.crop_padding or 0
    state0 = members[0].state
    for m in members:
        for cb in m.callbacks:
            cb.on_epoch_start(epoch)
    for step_i, batches in enumerate(zip(*its, strict=True)):
        lr = lr_at(state0.step, e0.total_steps, cfg)
        for group in pack.optimizer.param_groups:
            group["lr"] = lr
        xb = torch.cat([b[0] for b in batches])
        aug = [torch.cat([b[2][j] for b in batches]) for j in range(3)]
        x = e0.norm.from_uint8(augment_gather(xb, aug[0], aug[1], aug[2], pad, False), False)
        x = x.view(k, -1, *x.shape[1:])
        y = torch.stack([b[1] for b in batches])
        check = (step_i + 1) % e0.check_every == 0 or step_i + 1 == e0.steps_per_epoch
        if graphed is not None:
            # the whole step, update included, in one replay, each member at its own rate: a
            # non-finite loss is seen after its update, and the member frozen from then on (its
            # state is never saved again, so it records what the eager pack records)
            losses, logits = graphed(x, y, [lr_at(m.state.step, m.engine.total_steps, m.engine.cfg) for m in members])
            for m in members:
                m.state.step += 1
            if check:
                _freeze_failed(pack, losses, failed, newly)
        else:
            with e0.autocast():
                losses, logits = pack.train_losses(x, y, cfg.label_smoothing)
            if loss_hook is not None:
                losses = loss_hook(state0.step + 1, losses)
            pack.optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            for m in members:
                m.state.step += 1
            if check:
                _freeze_failed(pack, losses, failed, newly)  # before the step: its state stays the last good one
            pack.step()
        ld = losses.detach()
        loss_sum += ld.double() * y.shape[1]
        correct += (logits.detach().argmax(2) == y).sum(1).double()
        seen += y.shape[1]
        if step_i + 1 in e0.mid_evals:
            te = time.perf_counter()
            val = _evaluate(members, pack, "val")
            for i, m in enumerate(members):
                if not failed[i]:
                    m.state.evals.append(
                        {
                            "epoch": round(epoch - 1 + (step_i + 1) / e0.steps_per_epoch, 4),
                            "step": m.state.step,
                            "val_loss": val[i][0],
                            "val_acc": val[i][1],
                        }
                    )
            eval_time += time.perf_counter() - te
    train_s = time.perf_counter() - t0 - eval_time
    sums = loss_sum.tolist()
    out: list[EpochResult | None] = []
    for i in range(k):
        if failed[i] or not torch.isfinite(torch.tensor(sums[i])):
            out.append(None)
        else:
            out.append(EpochResult(sums[i] / seen, float(correct[i]) / seen, float(seen), train_s, lr))
    return out


def _freeze_failed(pack: PackedModel, losses: torch.Tensor, failed: list[bool], newly: set[int]) -> None:
    """Freeze every member whose loss is not finite and was not failed before."""
    finite = torch.isfinite(losses.detach()).tolist()
    for i, ok in enumerate(finite):
        if not ok and not failed[i]:
            failed[i] = True
            newly.add(i)
            pack.freeze(i)


def _test_results(members: list[Member], pack: PackedModel) -> list[tuple[float, float]]:
    """Every member's ``(loss, accuracy)`` on the test images once trained: as alone
    (:func:`reslab.engine.train.final_test_result`), the last epoch's validation where the
    validation images are the test images, else a pass of the pack."""
    e0 = members[0].engine
    alive = [m for m in members if m.alive]
    if e0.source.val_is_test and all(m.state.metrics and m.state.metrics[-1]["epoch"] == e0.cfg.epochs for m in alive):
        last = [m.state.metrics[-1] if m.alive else {"val_loss": math.nan, "val_acc": math.nan} for m in members]
        return [(r["val_loss"], r["val_acc"]) for r in last]
    return _evaluate(members, pack, "test")


def _evaluate(members: list[Member], pack: PackedModel, which: str) -> list[tuple[float, float]]:
    """Every member's ``(loss, accuracy)`` on the ``"val"`` or ``"test"`` images."""
    e0 = members[0].engine
    k = len(members)
    loss_sum = torch.zeros(k, dtype=torch.float64, device=e0.device)
    correct = torch.zeros(k, dtype=torch.float64, device=e0.device)
    count = 0
    with torch.inference_mode():
        for x, y in e0.source.eval_batches(which, e0.cfg.eval_batch_size):
            with e0.autocast():
                logits = pack.eval_logits(e0.norm.from_uint8(x, False)).float()
            # plain cross-entropy (no smoothing), summed per batch as alone
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="none")
            loss_sum += ce.view(k, -1).sum(1).double()
            correct += (logits.argmax(2) == y).sum(1).double()
            count += len(y)
    n = max(count, 1)
    return [(float(a) / n, float(b) / n) for a, b in zip(loss_sum.tolist(), correct.tolist(), strict=True)]
