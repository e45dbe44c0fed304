"""Which documents a process scores, for --shard I/N and torchrun ranks. Pure functions.

The rule depends only on a document's index (its position in the whole input), so every process
knows its share while it reads, without knowing the rest of the corpus: document d belongs to
shard d mod N, and within a shard its documents are dealt round-robin to the ranks.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import parse_shard


def share(shard: str | None, rank: int = 0, world: int = 1, joined: bool = False) -> Callable[[int], bool]:
    """Whether document d is this process's: shard d mod N, then rank (d div N) mod world.

    A convention that joins all documents into one sequence scores it in shard 0, rank 0.
    """
    index, count = parse_shard(shard) if shard else (0, 1)
    if joined:
        return lambda d: index == 0 and rank == 0
    return lambda d: d % count == index and (d // count) % world == rank
