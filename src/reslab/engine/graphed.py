"""A training step captured once as a CUDA graph and replayed (``cuda_graphs``).

A small ResNet's training step on a GPU is a few hundred short kernels, and launching them
from Python costs more than running them (resnet20 at batch 128 trained at 1.14x a hand
loop on an H200, both launch-bound). A CUDA graph launches the whole step at once:

* the first :data:`WARMUP_STEPS` steps run eagerly on a side stream (PyTorch's advice before
  a capture; they also create the optimizer's momentum buffers);
* the next step is captured: forward under autocast without its weight-cast cache,
  loss, backward, and the SGD update of :class:`CapturableSGD`, which reads the learning
  rate from a device tensor instead of a Python number baked into the graph;
* every later step copies its batch into the graph's input buffers, writes the learning
  rate into its tensor, and replays.

What stays the run's own: the optimizer is the run's ``torch.optim.SGD`` and the graph
updates its momentum buffers in place, so checkpoints, resume and ``state_dict`` are
unchanged; BatchNorm statistics update in the graph; a batch of another shape (a last,
smaller one) takes an eager step with the same optimizer. The update is SGD's arithmetic
in other kernels, so a graphed run equals the eager run to rounding, not bit for bit.
DropPath draws come from the CUDA generator, which the graph reads at each replay, so the
engine's per-epoch reseeding keeps a graphed run reproducible.

Where it does not apply (:func:`graphs_refusal`): the CPU, several processes (DDP),
``compile`` and ``probe_every`` (which reads gradients every K steps).

A pack of runs (:mod:`reslab.engine.packed`) replays its step the same way
(:mod:`reslab.engine.packed.graphed`): one graph for all its members, whose learning rates
are a K-vector on the device (:class:`CapturableSGD` moves each member's slice of the stacked
parameters by its own), captured again when a member freezes.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn

#: eager steps before the capture
WARMUP_STEPS = 3


def graphs_refusal(
    device: torch.device, distributed: bool, compile: bool, probe_every: int, model: nn.Module | None = None
) -> str:
    """Why a run with these settings (and ``model``) cannot train with CUDA graphs ("" when it can)."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {device.type}"
    if distributed:
        return "CUDA graphs are not used under torchrun (DDP's gradient hooks)"
    if compile:
        return "compile and CUDA graphs are two ways to the same end; choose one"
    if probe_every:
        return "the gradient-norm probe (probe_every) reads gradients between steps; train without CUDA graphs"
    for name, m in model.named_modules() if model is not None else ():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.momentum is None:
            return f"BatchNorm {name} averages cumulatively (momentum None), which reads its count on the host"
    return ""


def on_side_stream(
    side: bool, device: torch.device, step: Callable[[], tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor]:
    """``step()`` (one eager training step), on a side stream when ``side`` (PyTorch's advice for the
    steps before a capture), its outputs handed back to the current stream; else just ``step()``."""
    stream = torch.cuda.Stream(device=device) if side else None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # None: a no-op context, here and on a CPU-only build
        out = step()
    if stream is not None:
        main = torch.cuda.current_stream(device)
        main.wait_stream(stream)
        for t in out:  # made on the side stream, read on the main one: their memory is not reused before that
            t.record_stream(main)
    return out


class CapturableSGD:
    """``torch.optim.SGD``'s update (momentum, dampening, Nesterov, weight decay per group) on
    that optimizer's own parameters and momentum buffers, with the learning rate a tensor on
    the device, so that a CUDA graph can capture it. The arithmetic and its order are the
    optimizer's own (``torch.optim.sgd._multi_tensor_sgd``); ``lr`` multiplies the update as a
    tensor rather than as the ``alpha`` of the final add.

    The learning rate is a 0-d tensor (one run) or a K-vector (a pack,
    :mod:`reslab.engine.packed.graphed`): the parameters are then stacked, their leading
    dimension the K members, and member ``i``'s slice moves by ``lr[i]``. A parameter without a
    momentum buffer gets one as torch's first step makes it (the update itself), which only an
    eager step may do: a capture needs every buffer made before (:meth:`ready`)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if type(optimizer) is not torch.optim.SGD:
            raise TypeError(f"CapturableSGD takes torch.optim.SGD, not {type(optimizer).__name__}")
        for g in optimizer.param_groups:
            if g.get("maximize") or g.get("differentiable"):
                raise ValueError("CapturableSGD does not do maximize or differentiable SGD")
        self.optimizer = optimizer

    def ready(self) -> bool:
        """Whether every parameter with a gradient has its momentum buffer (one eager step made them)."""
        for g in self.optimizer.param_groups:
            if g["momentum"] == 0:
                continue
            for p in g["params"]:
                if p.grad is not None and self.optimizer.state.get(p, {}).get("momentum_buffer") is None:
                    return False
        return True

    @torch.no_grad()
    def step(self, lr: dict[torch.dtype, Tensor]) -> None:
        """One update; ``lr`` holds the learning rate per parameter dtype (the fused foreach
        kernels take a scalar tensor of their lists' own dtype): a 0-d device tensor, or a
        K-vector of per-member rates for stacked parameters."""
        for g in self.optimizer.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            wd, momentum, dampening = g["weight_decay"], g["momentum"], g["dampening"]
            d = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else grads
            if momentum != 0:
                states = [self.optimizer.state[p] for p in params]
                old = [i for i, st in enumerate(states) if st.get("momentum_buffer") is not None]
                if old:
                    bufs = [states[i]["momentum_buffer"] for i in old]
                    torch._foreach_mul_(bufs, momentum)
                    torch._foreach_add_(bufs, [d[i] for i in old], alpha=1 - dampening)
                for i, st in enumerate(states):  # torch's first step: the buffer is the update itself
                    if st.get("momentum_buffer") is None:
                        st["momentum_buffer"] = torch.clone(d[i]).detach()
                bufs = [st["momentum_buffer"] for st in states]
                if g["nesterov"]:
                    torch._foreach_add_(d, bufs, alpha=momentum)
                else:
                    d = bufs
            by_dtype: dict[torch.dtype, list[int]] = {}
            for i, p in enumerate(params):
                by_dtype.setdefault(p.dtype, []).append(i)
            for dtype, idx in by_dtype.items():
                rate = lr[dtype]
                if rate.dim() == 0:
                    torch._foreach_sub_([params[i] for i in idx], torch._foreach_mul([d[i] for i in idx], rate))
                    continue
                for i in idx:  # member k's slice of each stacked parameter moves by rate[k]
                    p = params[i]
                    p.addcmul_(d[i], rate.view(-1, *[1] * (p.dim() - 1)), value=-1)


class GraphedStep:
    """The training step of ``model`` (``criterion`` on its float logits, ``optimizer``),
    captured after :data:`WARMUP_STEPS` eager steps and replayed (see the module's notes).

    ``autocast(cache_enabled)`` gives the forward pass's autocast context (or a null one).
    Calling it with a batch and the step's learning rate trains one step and returns the
    loss and the logits, which stay valid until the next call."""

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module,
        optimizer: torch.optim.Optimizer,
        autocast: Callable[[bool], AbstractContextManager[Any]],
        capture: bool = True,
    ) -> None:
        self.model, self.criterion, self.optimizer, self.autocast = model, criterion, optimizer, autocast
        self.sgd = CapturableSGD(optimizer)
        #: False: run the graphed path's arithmetic eagerly (to test it where there is no GPU)
        self.capture = capture
        self.graph: Any = None
        self.key: tuple[Any, ...] | None = None
        self.eager_steps = 0
        self.replays = 0
        #: the learning rate as a 0-d device tensor per parameter dtype, written before each replay
        self.lr: dict[torch.dtype, Tensor] = {}
        #: the batch shape of the last eager step: the capture waits for a batch like it
        self.last_key: tuple[Any, ...] | None = None
        self.static: dict[str, Tensor] = {}

    def __call__(self, x: Tensor, y: Tensor, lr: float) -> tuple[Tensor, Tensor]:
        key = (tuple(x.shape), x.dtype, x.stride(), tuple(y.shape))
        if self.graph is not None and key == self.key:
            return self._replay(x, y, lr)
        if self.graph is None and self.eager_steps >= WARMUP_STEPS and key == self.last_key and self.sgd.ready():
            self._capture(x, y, key)
            return self._replay(x, y, lr)
        self.last_key = key
        return self._eager(x, y, lr)

    def _forward_backward(self, x: Tensor, y: Tensor, cache: bool) -> tuple[Tensor, Tensor]:
        with self.autocast(cache):
            logits = self.model(x)
            loss = self.criterion(logits.float(), y)
        loss.backward()
        return loss, logits

    def _eager(self, x: Tensor, y: Tensor, lr: float) -> tuple[Tensor, Tensor]:
        """The engine's ordinary step, on a side stream while warming up for a capture."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        def step() -> tuple[Tensor, Tensor]:
            # once a graph exists its gradients stay the ones the eager step fills (no second set)
            self.optimizer.zero_grad(set_to_none=self.graph is None)
            out = self._forward_backward(x, y, True)
            self.optimizer.step()
            return out

        loss, logits = on_side_stream(self.capture and self.graph is None and x.is_cuda, x.device, step)
        self.eager_steps += 1
        return loss, logits

    def _capture(self, x: Tensor, y: Tensor, key: tuple[Any, ...]) -> None:
        self.static = {"x": x.clone(), "y": y.clone()}
        dtypes = {p.dtype for g in self.optimizer.param_groups for p in g["params"]}
        self.lr = {dt: torch.zeros((), dtype=dt, device=x.device) for dt in dtypes}
        self.optimizer.zero_grad(set_to_none=True)
        if self.capture:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.static["loss"], self.static["logits"] = self._forward_backward(
                    self.static["x"], self.static["y"], False
                )
                self.sgd.step(self.lr)
            self.graph = graph
        else:
            self.graph = self._uncaptured
        self.key = key

    def _uncaptured(self) -> None:
        """What the graph records, run eagerly (``capture=False``)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.static["loss"], self.static["logits"] = self._forward_backward(self.static["x"], self.static["y"], False)
        self.sgd.step(self.lr)

    def _replay(self, x: Tensor, y: Tensor, lr: float) -> tuple[Tensor, Tensor]:
        self.static["x"].copy_(x)
        self.static["y"].copy_(y)
        for t in self.lr.values():
            t.fill_(lr)
        for group in self.optimizer.param_groups:  # what a checkpoint of this step records
            group["lr"] = lr
        if self.capture:
            self.graph.replay()
        else:
            self.graph()
        self.replays += 1
        return self.static["loss"], self.static["logits"]


__all__ = ["WARMUP_STEPS", "CapturableSGD", "GraphedStep", "graphs_refusal", "on_side_stream"]
