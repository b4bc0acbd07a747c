"""A pack's training step captured once as a CUDA graph and replayed (``cuda_graphs`` on a pack).

The design is a run's graphed step (:mod:`reslab.engine.graphed`) on the pack's stacked state
(:class:`~reslab.engine.packed.stack.PackedModel`, either route):

* the first :data:`~reslab.engine.graphed.WARMUP_STEPS` steps run eagerly on a side stream
  (they also create the stacked optimizer's momentum buffers, as torch's first step does);
* the next step of the same batch shape is captured: the pack's forward pass under autocast
  without its weight-cast cache, the members' losses, one backward pass of their sum, the SGD
  update of :class:`~reslab.engine.graphed.CapturableSGD` and the copies that put frozen
  members back;
* every later step copies the members' batches (``K x B x C x H x W``) into the graph's input
  buffers, writes each member's learning rate into a K-vector on the device, and replays.

The learning rates are that K-vector, never numbers baked into the graph: member ``k``'s slice
of every stacked parameter moves by ``lr[k]``, so each member follows its own schedule value.
Its optimizer state is its slice of the stacked momentum buffers, which the graph updates in
place: :meth:`PackedModel.to_members` copies them into each member's optimizer before its
checkpoint is written, so a checkpoint is what the eager pack writes, and resume (kill -9
included) is exact. A batch of another shape takes an eager step of the same arithmetic.

Frozen members: putting a frozen member back to its snapshot is part of the captured step, so
when the pack's membership changes (a member freezes) the graph no longer does what the step
must. It is dropped and **captured again** at the next step of its shape, without a new
warm-up; falling back to eager steps would pay every remaining step's launches for an event
that happens at most once per member. Since the update is inside the graph, a non-finite loss
is seen after its update (as for a run alone, :mod:`reslab.engine.graphed`): the member is
frozen one step later than in the eager pack, but a diverged member's state is never saved
again (its folder keeps its last good epoch), so what it records is the same.

Where there is no GPU, ``capture=False`` runs exactly the arithmetic the graph records
(:meth:`GraphedPackStep._uncaptured`) eagerly, with the same warm-up, capture points and
re-captures, so the CPU tests the bookkeeping. :attr:`GraphedPackStep.startup` times the
start (warm-up, capture, first replay), synchronised with the device at each boundary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

from reslab.engine.devices import synchronize
from reslab.engine.graphed import WARMUP_STEPS, CapturableSGD, graphs_refusal, on_side_stream
from reslab.engine.packed.stack import PackedModel


def pack_graphs_refusal(
    device: torch.device,
    distributed: bool,
    compile: bool,
    probe_every: int,
    model: nn.Module | None = None,
    capture: bool = True,
) -> str:
    """Why a pack with these settings (and member ``model``) cannot train with CUDA graphs
    ("" when it can): what refuses a run's graph (:func:`~reslab.engine.graphed.graphs_refusal`),
    the device only where the step is really captured (``capture=False`` runs its arithmetic
    eagerly, on any device)."""
    return graphs_refusal(device if capture else torch.device("cuda"), distributed, compile, probe_every, model)


class GraphedPackStep:
    """The training step of ``pack`` (the members' cross-entropy with ``label_smoothing``,
    summed, and the stacked SGD), captured after the warm-up and replayed (see the module's
    notes). ``autocast(cache_enabled)`` gives the forward pass's autocast context.

    Calling it with the members' batches ``x`` (K x B x C x H x W), labels ``y`` (K x B) and
    their learning rates (K numbers) trains one step and returns the members' losses (a
    K-vector) and logits, which stay valid until the next call. ``loss_hook`` (only with
    ``capture=False``: a replayed graph runs no Python) may change the losses before the
    backward pass, for fault injection in tests. ``on_start`` is called once, after the first
    replay, with :attr:`startup`."""

    def __init__(
        self,
        pack: PackedModel,
        autocast: Callable[[bool], AbstractContextManager[Any]],
        label_smoothing: float = 0.0,
        capture: bool = True,
        loss_hook: Callable[[Tensor], Tensor] | None = None,
        on_start: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        if capture and loss_hook is not None:
            raise ValueError("a loss hook runs Python at every step, which a replayed CUDA graph does not")
        self.pack, self.autocast, self.label_smoothing = pack, autocast, label_smoothing
        self.sgd = CapturableSGD(pack.optimizer)
        #: False: run the graphed path's arithmetic eagerly (to test it where there is no GPU)
        self.capture = capture
        self.loss_hook, self.on_start = loss_hook, on_start
        self.graph: Any = None
        self.key: tuple[Any, ...] | None = None
        #: the batch shape of the last eager step: a capture waits for a batch like it
        self.last_key: tuple[Any, ...] | None = None
        #: the frozen members the graph puts back: another set means capturing again
        self.frozen_in_graph: frozenset[int] = frozenset()
        self.eager_steps = self.replays = self.captures = 0
        params = [p for g in pack.optimizer.param_groups for p in g["params"]]
        #: each member's learning rate, a K-vector on the device per parameter dtype, written before each step
        self.lr: dict[torch.dtype, Tensor] = {
            dt: torch.zeros(pack.k, dtype=dt, device=params[0].device) for dt in {p.dtype for p in params}
        }
        self.static: dict[str, Tensor] = {}
        #: seconds of the start: warm-up (from the first call to the capture, its eager steps
        #: and whatever the caller did between them), capture, first replay; set at the first replay
        self.startup: dict[str, float] = {}
        self._t0: float | None = None

    def __call__(self, x: Tensor, y: Tensor, lrs: Sequence[float]) -> tuple[Tensor, Tensor]:
        if len(lrs) != self.pack.k:
            raise ValueError(f"a pack of {self.pack.k} takes {self.pack.k} learning rates, got {len(lrs)}")
        if self._t0 is None:
            synchronize(x.device)
            self._t0 = time.perf_counter()
        self._write_lr(lrs)
        key = (tuple(x.shape), x.dtype, x.stride(), tuple(y.shape))
        if self.graph is not None and frozenset(self.pack.frozen) != self.frozen_in_graph:
            # a member froze since the capture: the graph would not put it back, so it is
            # dropped and captured again at this step (no new warm-up: the buffers exist)
            self.graph, self.static, self.last_key = None, {}, self.key
        if self.graph is not None and key == self.key:
            return self._replay(x, y)
        if self.graph is None and self.eager_steps >= WARMUP_STEPS and key == self.last_key and self.sgd.ready():
            self._capture(x, y, key)
            return self._replay(x, y)
        self.last_key = key
        return self._eager(x, y)

    def _write_lr(self, lrs: Sequence[float]) -> None:
        """The step's learning rates into the device vector (one fill when they are equal, as
        in a pack of one schedule), and the first into the optimizer's groups: what a
        checkpoint of this step records (the members of a ``train_pack`` share their schedule
        and step, so their rates are equal)."""
        same = all(v == lrs[0] for v in lrs)
        for t in self.lr.values():
            if same:
                t.fill_(lrs[0])
            else:
                for i, v in enumerate(lrs):
                    t[i].fill_(v)
        for group in self.pack.optimizer.param_groups:
            group["lr"] = lrs[0]

    def _forward_backward(self, x: Tensor, y: Tensor, cache: bool) -> tuple[Tensor, Tensor]:
        with self.autocast(cache):
            losses, logits = self.pack.train_losses(x, y, self.label_smoothing)
        if self.loss_hook is not None:
            losses = self.loss_hook(losses)
        losses.sum().backward()
        return losses, logits

    def _update(self, frozen: Collection[int]) -> None:
        """The stacked SGD with the members' rates, then the ``frozen`` members put back."""
        self.sgd.step(self.lr)
        if frozen:
            self.pack.restore_frozen(frozen)

    def _eager(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """One step of the graph's arithmetic, eagerly; on a side stream while warming up for a capture."""

        def step() -> tuple[Tensor, Tensor]:
            # once a graph exists its gradients stay the ones the eager step fills (no second set)
            self.pack.optimizer.zero_grad(set_to_none=self.graph is None)
            out = self._forward_backward(x, y, True)
            self._update(frozenset(self.pack.frozen))
            return out

        losses, logits = on_side_stream(self.capture and self.graph is None and x.is_cuda, x.device, step)
        self.eager_steps += 1
        return losses, logits

    def _capture(self, x: Tensor, y: Tensor, key: tuple[Any, ...]) -> None:
        synchronize(x.device)
        t0 = time.perf_counter()
        self.static = {"x": x.clone(), "y": y.clone()}
        self.pack.optimizer.zero_grad(set_to_none=True)
        if self.capture:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.static["losses"], self.static["logits"] = self._forward_backward(
                    self.static["x"], self.static["y"], False
                )
                self._update(frozenset(self.pack.frozen))
            self.graph = graph
        else:
            self.graph = self._uncaptured
        self.key, self.frozen_in_graph = key, frozenset(self.pack.frozen)
        self.captures += 1
        synchronize(x.device)
        if not self.startup and self._t0 is not None:
            self.startup = {
                "warmup_s": t0 - self._t0,
                "warmup_steps": float(self.eager_steps),
                "capture_s": time.perf_counter() - t0,
            }

    def _uncaptured(self) -> None:
        """What the graph records, run eagerly (``capture=False``): the members it puts back
        are those frozen when it was captured."""
        self.pack.optimizer.zero_grad(set_to_none=True)
        self.static["losses"], self.static["logits"] = self._forward_backward(self.static["x"], self.static["y"], False)
        self._update(self.frozen_in_graph)

    def _replay(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        first = self.replays == 0
        t0 = time.perf_counter()
        self.static["x"].copy_(x)
        self.static["y"].copy_(y)
        if self.capture:
            self.graph.replay()
        else:
            self.graph()
        self.replays += 1
        if first:
            synchronize(x.device)
            self.startup["first_step_s"] = time.perf_counter() - t0
            if self.on_start is not None:
                self.on_start(dict(self.startup))
        return self.static["losses"], self.static["logits"]


__all__ = ["GraphedPackStep", "pack_graphs_refusal"]
