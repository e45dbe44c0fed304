"""The progress bar on stderr: documents, tokens and tokens/s as they are scored.

The total of a streamed corpus is rarely known. The bar fills, and its ETA comes, from the bytes
read out of the input files' size (or documents out of --limit); otherwise it counts tokens.
"""

from __future__ import annotations

import sys
import time

REFRESH_S = 0.5  # the bar is redrawn at least this often while documents are scored


class Progress:
    def __init__(self, stream, limit: int | None, enabled: bool):
        from tqdm.auto import tqdm

        self.stream = stream
        self.total_bytes = None if limit else stream.total_bytes
        self.limit = limit
        self.documents = self.tokens = self.scored_now = 0
        self.started = self.shown = time.perf_counter()
        eta = " [{elapsed}<{remaining}]"
        if self.total_bytes:  # "scoring:  11%|█    | 45.2MB/400MB, 12,345 docs, 1.2M tok, 3.4k tok/s [00:10<01:20]"
            total, fmt_ = self.total_bytes, "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B{postfix}" + eta
        elif limit:
            total, fmt_ = limit, "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} documents read{postfix}" + eta
        else:
            total, fmt_ = None, "{desc}{postfix} [{elapsed}]"
        self.bar = tqdm(
            total=total, unit_scale=True, desc="scoring", disable=not enabled, file=sys.stderr, smoothing=0.1, bar_format=fmt_
        )

    def update(self, tokens: int = 0, documents: int = 0, scored: bool = True) -> None:
        """`tokens` more tokens and `documents` more documents are done (scored now if `scored`)."""
        self.tokens += tokens
        self.documents += documents
        if scored:
            self.scored_now += tokens
        if self.bar.disable:
            return
        position = self.stream.counter.bytes if self.total_bytes else self.stream.count if self.limit else self.tokens
        self.bar.update(position - self.bar.n)
        now = time.perf_counter()
        rate = self.scored_now / max(now - self.started, 1e-9)
        self.bar.set_postfix_str(f"{self.documents:,} docs, {fmt(self.tokens)} tok, {fmt(rate)} tok/s", refresh=False)
        if now - self.shown >= REFRESH_S:  # the counts move even when the bytes read do not (a file read ahead whole)
            self.bar.refresh()
            self.shown = now

    def close(self) -> None:
        self.bar.close()


def fmt(n: float) -> str:
    from tqdm import tqdm

    return tqdm.format_sizeof(n)
