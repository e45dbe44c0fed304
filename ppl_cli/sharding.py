"""Splitting documents into token-balanced shares: for --shard I/N and for torchrun ranks. Pure."""

from __future__ import annotations

import re

from .errors import PplError


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise PplError(f"--shard must look like I/N (for example 0/8), not {text!r}")
    index, count = int(match[1]), int(match[2])
    if count < 1 or index >= count:
        raise PplError(f"--shard {text}: need 0 <= I < N")
    return index, count


def balanced_split(sizes: list[int], parts: int) -> list[list[int]]:
    """Indices of `sizes` in `parts` shares of about equal total size, each share in input order.

    Largest first, each to the share with the smallest total so far (ties: the lower share), which
    depends only on the sizes: every process computes the same split without talking to the others.
    """
    totals = [0] * parts
    shares: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = min(range(parts), key=lambda p: (totals[p], p))
        shares[target].append(i)
        totals[target] += sizes[i]
    return [sorted(share) for share in shares]


def select(indices: list[int], sizes: list[int], index: int, parts: int) -> list[int]:
    """Share `index` of `parts` of the documents `indices` (whose sizes are sizes[i])."""
    share = balanced_split([sizes[i] for i in indices], parts)[index]
    return [indices[k] for k in share]
