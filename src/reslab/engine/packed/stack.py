"""K models of one architecture as one packed model: their stacked state, and two routes
for the forward pass.

The members' parameters and buffers are stacked along a new leading dimension
(``stack_module_state``). The forward pass takes one of two routes (:data:`ROUTES`):

* ``vmap``: one forward pass of a stateless copy of the architecture is mapped over that
  dimension with ``vmap`` (``functional_call``): a convolution over a batch of weights
  becomes one grouped convolution, a BatchNorm updates each member's own slice of the
  stacked running statistics, and random layers (DropPath) draw per member
  (``randomness="different"``). Nothing here knows a technique: whatever a technique adds
  to a block is a parameter or buffer of the module and is stacked like the rest, so any
  plugin technique packs with no code of its own.
* ``grouped``: one network of grouped layers (:mod:`.grouped`) whose parameters are views
  of the same stacked tensors; no layout changes between layers, and channels_last on a
  GPU. It exists where the model has a grouped form, which
  :func:`~reslab.engine.packed.check.pack_route` checks numerically before using it.

SGD on stacked tensors is elementwise, so a member's slice of the momentum buffer and its
weight decay are what it would have alone, by either route. The members' own modules and
optimizers are kept beside the pack: :meth:`PackedModel.to_members` copies each member's
slices back into them, so a member's checkpoint and weights are written by the engine's own
functions and read back by them (:meth:`PackedModel.from_members`) exactly as a run
trained alone.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from reslab.engine.optim import param_groups
from reslab.engine.packed.grouped import channels_last_stack, grouped_model

#: how a pack computes its members' forward passes: ``vmap`` over any architecture, or one
#: model of grouped layers (:mod:`.grouped`) where the architecture has a grouped form
ROUTES = ("vmap", "grouped")


def _norm_in_fp32(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
    """BatchNorm of a pack takes fp32 input under autocast: ``vmap``'s batching rule of batch
    norm calls the kernel in a form whose CUDA version refuses bf16 input with fp32 running
    statistics (measured on an H200, torch 2.11); the next convolution casts back to bf16."""
    x = args[0]
    return (x.float(), *args[1:]) if x.dtype in (torch.bfloat16, torch.float16) else None


class PackedModel:
    """The stacked state of K member models, their stacked optimizer, and frozen members."""

    def __init__(
        self,
        members: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        weight_decay: float,
        momentum: float,
        nesterov: bool,
        lr: float,
        route: str = "vmap",
        channels_last: bool = False,
    ) -> None:
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        self.members, self.member_opts = list(members), list(optimizers)
        self.k = len(self.members)
        self.route = route
        #: the grouped route may run its convolutions in channels_last (the vmap route cannot)
        self.channels_last = channels_last and route == "grouped"
        params, buffers = stack_module_state(self.members)  # type: ignore[arg-type]
        if route == "grouped":
            self.grouped, self.views = grouped_model(self.members[0], self.k)
            if self.channels_last:  # conv weights (K x 4-d) stored so their grouped view is channels_last
                params = {
                    n: channels_last_stack(t.detach()).requires_grad_() if t.dim() == 5 else t
                    for n, t in params.items()
                }
        else:
            # a stateless copy of the architecture that functional_call fills with each slice
            self.base = copy.deepcopy(self.members[0]).to("meta")
            for m in self.base.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.register_forward_pre_hook(_norm_in_fp32)
        self.params: dict[str, Tensor] = params
        self.buffers: dict[str, Tensor] = buffers
        # the same groups, in the same order, as param_groups builds for each member: a
        # member's optimizer state and the stacked one index their parameters alike
        names = {id(p): n for n, p in self.members[0].named_parameters()}
        groups = param_groups(self.members[0], weight_decay)
        self.group_names = [[names[id(p)] for p in g["params"]] for g in groups]
        self.optimizer = torch.optim.SGD(
            [
                {"params": [self.params[n] for n in gn], "weight_decay": g["weight_decay"]}
                for gn, g in zip(self.group_names, groups, strict=True)
            ],
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
        )
        self.from_members()
        #: member index -> its parameters, buffers and optimizer state when it was frozen
        self.frozen: dict[int, dict[str, Tensor]] = {}

    # ------------------------------------------------------------------ forward passes
    def _call(self, p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.base, (p, b), (x,))

    def _grouped_call(self, xp: Tensor) -> Tensor:
        """The grouped model on ``B x K*C x H x W`` input: ``K x B x classes`` logits."""
        if self.channels_last:
            xp = xp.contiguous(memory_format=torch.channels_last)
        state = {n: self.views[n](t) for n, t in (*self.params.items(), *self.buffers.items())}
        out = functional_call(self.grouped, state, (xp,))
        return out.view(out.shape[0], self.k, -1).transpose(0, 1)

    def train_losses(self, x: Tensor, y: Tensor, label_smoothing: float) -> tuple[Tensor, Tensor]:
        """Each member's mean training loss over its own batch (``x``: K x B x C x H x W,
        ``y``: K x B) and its logits (K x B x classes), in training mode."""
        if self.route == "grouped":
            self.grouped.train()
            k, b = x.shape[:2]
            logits = self._grouped_call(x.transpose(0, 1).reshape(b, -1, *x.shape[3:]))
            ce = F.cross_entropy(
                _full(logits).reshape(k * b, -1), y.reshape(-1), reduction="none", label_smoothing=label_smoothing
            )
            return ce.view(k, b).mean(1), logits
        self.base.train()

        def one(p: dict[str, Tensor], b: dict[str, Tensor], xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor]:
            logits = self._call(p, b, xb)
            return F.cross_entropy(_full(logits), yb, label_smoothing=label_smoothing), logits

        return vmap(one, randomness="different")(self.params, self.buffers, x, y)  # type: ignore[no-any-return]

    def eval_logits(self, x: Tensor) -> Tensor:
        """Every member's logits (K x B x classes) for the same images ``x``, in eval mode."""
        if self.route == "grouped":
            self.grouped.eval()
            try:
                return self._grouped_call(x.repeat(1, self.k, 1, 1))
            finally:
                self.grouped.train()
        self.base.eval()
        try:
            return vmap(self._call, in_dims=(0, 0, None))(self.params, self.buffers, x)  # type: ignore[no-any-return]
        finally:
            self.base.train()

    # ------------------------------------------------------------------ the members' state
    def step(self) -> None:
        """One optimizer step; frozen members get their frozen state back."""
        self.optimizer.step()
        if self.frozen:
            self.restore_frozen()

    def _momentum(self) -> dict[str, Tensor]:
        out = {}
        for gn, group in zip(self.group_names, self.optimizer.param_groups, strict=True):
            for n, p in zip(gn, group["params"], strict=True):
                buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    out[n] = buf
        return out

    def freeze(self, i: int) -> None:
        """Stop member ``i`` changing: from now on every step puts its parameters, buffers
        and momentum back to what they are now."""
        if i in self.frozen:
            return
        snap = {f"p:{n}": t[i].detach().clone() for n, t in self.params.items()}
        snap.update({f"b:{n}": t[i].clone() for n, t in self.buffers.items()})
        snap.update({f"m:{n}": t[i].clone() for n, t in self._momentum().items()})
        self.frozen[i] = snap

    def restore_frozen(self, members: Collection[int] | None = None) -> None:
        """Put every frozen member's (or those of ``members``) parameters, buffers and momentum
        back to its snapshot."""
        momentum = self._momentum()
        with torch.no_grad():
            for i, snap in self.frozen.items():
                if members is not None and i not in members:
                    continue
                for key, v in snap.items():
                    kind, n = key.split(":", 1)
                    table = self.params if kind == "p" else self.buffers if kind == "b" else momentum
                    if n in table:
                        table[n][i].copy_(v)

    def to_members(self, indices: Sequence[int] | None = None) -> None:
        """Copy the stacked state into the members' own modules and optimizers (before
        the engine writes their checkpoints or weights)."""
        stacked = self.optimizer.state_dict()
        with torch.no_grad():
            for i in range(self.k) if indices is None else indices:
                m = self.members[i]
                for n, p in m.named_parameters():
                    p.copy_(self.params[n][i])
                for n, b in m.named_buffers():
                    b.copy_(self.buffers[n][i])
                sliced = {
                    idx: {key: _slice(v, i, self.k) for key, v in st.items()} for idx, st in stacked["state"].items()
                }
                self.member_opts[i].load_state_dict(
                    {"state": sliced, "param_groups": copy.deepcopy(stacked["param_groups"])}
                )

    def from_members(self) -> None:
        """Stack the members' modules and optimizer states (fresh, or restored from their
        checkpoints) into the pack."""
        with torch.no_grad():
            for n, t in self.params.items():
                t.copy_(torch.stack([dict(m.named_parameters())[n].detach() for m in self.members]))
            for n, t in self.buffers.items():
                t.copy_(torch.stack([dict(m.named_buffers())[n] for m in self.members]))
        states = [o.state_dict() for o in self.member_opts]
        if not states[0]["state"]:
            return  # no step taken yet: nothing to stack
        sd = self.optimizer.state_dict()
        sd["state"] = {
            idx: {
                key: torch.stack([s["state"][idx][key] for s in states]) if torch.is_tensor(v) else v
                for key, v in st.items()
            }
            for idx, st in states[0]["state"].items()
        }
        sd["param_groups"] = [
            {**g, "lr": mg["lr"]} for g, mg in zip(sd["param_groups"], states[0]["param_groups"], strict=True)
        ]
        self.optimizer.load_state_dict(sd)
        # the buffers in the layout of their parameters (channels_last conv stacks): the fused
        # foreach kernels of SGD need every list alike
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                st = self.optimizer.state.get(p, {})
                buf = st.get("momentum_buffer")
                if buf is not None and buf.stride() != p.stride():
                    st["momentum_buffer"] = torch.empty_like(p).copy_(buf)


def _full(t: Tensor) -> Tensor:
    """Logits for the loss: float32 from a half precision, as they are from float32/64."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _slice(v: Any, i: int, k: int) -> Any:
    if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == k:
        return v[i].clone()
    return v
