"""torchrun support: which rank this process is, and the few collectives the pipeline needs.

Under torchrun (RANK, WORLD_SIZE and LOCAL_RANK in the environment) each rank scores its share of
the documents and rank 0 gathers the results and writes the reports. Objects travel over a gloo
group, so this works on CPU-only machines and beside NCCL alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    group: Any = None  # the gloo process group, when world > 1
    owned: bool = False  # this module started the process group, so it ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's `obj`, in rank order, on rank 0; None elsewhere."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.main else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier(group=self.group)


def start() -> Ranks:
    """Join the torchrun job if there is one; a plain process is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch.distributed as dist

    owned = not dist.is_initialized()  # a caller's own process group is used as it is, and left running
    if owned:
        dist.init_process_group(backend="gloo")
    group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), group, owned)


def stop(ranks: Ranks, finished: bool) -> None:
    """End the process group this module started. After a finished run every rank first waits for
    the others: gloo aborts a process ("terminate called without an active exception") whose peer
    tears the group down mid-exchange. After an error it does not wait (the others may never come)."""
    if ranks.owned:
        import torch.distributed as dist

        if dist.is_initialized():
            if finished:
                ranks.barrier()
            dist.destroy_process_group()
