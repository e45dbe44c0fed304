"""Which documents a sampled run scores (--sample, --sample-per-group): a hash of each document's
index and the seed decides, so every shard and rank agrees without talking.

--sample F keeps a document when its key is below F: each one is in the sample with probability
F, independently. --sample-per-group N keeps, in each group, the N documents with the smallest
keys (all of a smaller group): a simple random sample without replacement, which needs one scan
of the input first to know every group's documents.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

MASK = (1 << 64) - 1


def sample_key(index: int, seed: int) -> float:
    """A document's key in [0, 1): splitmix64 of its index mixed with the seed."""
    z = (index * 0x9E3779B97F4A7C15 + seed * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E5D) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return (z ^ (z >> 31)) / 2**64


@dataclass
class SamplePlan:
    """The documents a sampled run scores and what the estimate needs: each group's population
    (documents in the input) and how many of them are sampled (None: not known before scoring)."""

    method: str  # "share" or "per-group"
    seed: int
    share: float | None = None
    per_group: int | None = None
    chosen: set[int] | None = None  # per-group: the sampled indices
    population: dict[str, int] = field(default_factory=dict)
    sampled: dict[str, int] = field(default_factory=dict)

    def keeps(self, index: int) -> bool:
        if self.chosen is not None:
            return index in self.chosen
        return sample_key(index, self.seed) < self.share

    def describe(self) -> dict:
        out = {"method": self.method, "seed": self.seed}
        if self.method == "share":
            out["share"] = self.share
        else:
            out.update(per_group=self.per_group, population=self.population, sampled=self.sampled)
        return out


def share_plan(share: float, seed: int) -> SamplePlan:
    return SamplePlan("share", seed, share=share)


def per_group_plan(documents: Iterable[tuple[int, str]], per_group: int, seed: int) -> SamplePlan:
    """From one scan of (index, group) for every document of the input: the `per_group` smallest
    keys of each group (a max-heap of them, per group, while the scan passes)."""
    heaps: dict[str, list[tuple[float, int]]] = {}
    population: dict[str, int] = {}
    for index, group in documents:
        population[group] = population.get(group, 0) + 1
        heap = heaps.setdefault(group, [])
        item = (-sample_key(index, seed), index)
        if len(heap) < per_group:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)
    chosen = {index for heap in heaps.values() for _, index in heap}
    sampled = {group: len(heap) for group, heap in heaps.items()}
    return SamplePlan("per-group", seed, per_group=per_group, chosen=chosen, population=dict(sorted(population.items())),
                      sampled=dict(sorted(sampled.items())))  # fmt: skip


def sampled(mine: Callable[[int], bool], plan: SamplePlan | None) -> Callable[[int], bool]:
    """A process's share of the documents, narrowed to the sample."""
    if plan is None:
        return mine
    return lambda d: plan.keeps(d) and mine(d)
