"""Packed training: K runs that differ only in their seed, trained in one process as one
model (:mod:`.stack`): one network of grouped layers where the model has that form
(:mod:`.grouped`), else the model mapped over the runs with ``torch.func.vmap``; each run
writes the run folder it would write alone (:mod:`.loop`). Which runs may pack, and by
which route: :mod:`.check`. With ``cuda_graphs`` the pack's step is one replayed CUDA graph
(:mod:`.graphed`)."""

from reslab.engine.packed.check import check_pack, pack_groups, pack_route, packable
from reslab.engine.packed.loop import train_pack
from reslab.engine.packed.stack import PackedModel

__all__ = ["PackedModel", "check_pack", "pack_groups", "pack_route", "packable", "train_pack"]
