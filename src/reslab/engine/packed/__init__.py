"""Packed training: K runs that differ only in their seed, trained in one process as one
model mapped over the runs with ``torch.func.vmap`` (:mod:`.stack`), each writing the run
folder it would write alone (:mod:`.loop`). Which runs may pack: :mod:`.check`."""

from reslab.engine.packed.check import check_pack, pack_groups, packable
from reslab.engine.packed.loop import train_pack
from reslab.engine.packed.stack import PackedModel

__all__ = ["PackedModel", "check_pack", "pack_groups", "packable", "train_pack"]
