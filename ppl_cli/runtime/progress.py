"""The progress bar on stderr: tokens and documents scored against the total, with a rate and an ETA;
and other libraries' bars kept off it (library_bars).

Reading runs far ahead of scoring (the input is read and tokenized in a background thread), so
the bar counts what is scored, never what is read. Its total is the tokens to score: exact once
the reader has reached the end of the input; before that, estimated from the reader's tokens per
byte and the input's size in bytes (files), or, where the size is unknown (stdin, the hub), the
tokens the reader has seen so far, shown with a "+".
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

REFRESH_S = 0.5  # the bar is redrawn at most this often
BAR = "{{desc}}: {{percentage:3.0f}}%|{{bar}}| {}"  # tqdm's layout, then the counts


class Progress:
    def __init__(self, read, total_bytes: int | None, enabled: bool, clock=time.perf_counter):
        """`read`: what the reader has seen (engine.tokenizing.ReadTally: documents, tokens, bytes, finished)."""
        from tqdm.auto import tqdm

        self.read, self.total_bytes, self.clock = read, total_bytes, clock
        self.documents = self.tokens = self.scored_now = 0
        self.started = self.shown = clock()
        self.bar = tqdm(total=1, desc="scoring", disable=not enabled, file=sys.stderr, bar_format=BAR.format(""))

    def update(self, tokens: int = 0, documents: int = 0, scored: bool = True) -> None:
        """`tokens` more tokens and `documents` more documents are done (scored now, or by an earlier run)."""
        self.tokens += tokens
        self.documents += documents
        if scored:
            self.scored_now += tokens
        now = self.clock()
        if self.bar.disable or now - self.shown < REFRESH_S:
            return
        self.shown = now
        self.draw(now)

    def total(self) -> tuple[float, str]:
        """The tokens to score in all, and how it is known: "" exact, "~" estimated from the bytes, "+" at least."""
        read = self.read
        if read.finished:
            return read.tokens, ""
        if self.total_bytes and read.bytes:
            return max(read.tokens * self.total_bytes / read.bytes, read.tokens), "~"
        return read.tokens, "+"

    def line(self, now: float) -> tuple[float, str]:
        """The share done and the text after the bar: "1.2k/~36k tokens, 3/6 documents, 58 tok/s, 2:10 left"."""
        total, how = self.total()
        total = max(total, self.tokens)
        elapsed = now - self.started
        rate = self.scored_now / elapsed if elapsed > 0 else 0.0
        documents = f"{self.documents:,}/{self.read.documents:,}" if self.read.finished else f"{self.documents:,}"
        text = f"{fmt(self.tokens)}/{'~' if how == '~' else ''}{fmt(total)}{'+' if how == '+' else ''} tokens, {documents} documents"
        if rate:
            text += f", {fmt(rate)} tok/s"
            if how != "+" and total > self.tokens:
                text += f", {'~' if how else ''}{clock_time((total - self.tokens) / rate)} left"
        return (self.tokens / total if total else 0.0), text

    def draw(self, now: float, refresh: bool = True) -> None:
        share, text = self.line(now)
        self.bar.n = min(share, 1.0)
        self.bar.bar_format = BAR.format(text.replace("{", "{{").replace("}", "}}"))
        if refresh:
            self.bar.refresh()

    def close(self) -> None:
        """The final counts, drawn once as the bar closes."""
        if not self.bar.disable:
            self.draw(self.clock(), refresh=False)
        self.bar.close()


def fmt(n: float) -> str:
    from tqdm import tqdm

    return tqdm.format_sizeof(n)


def clock_time(seconds: float) -> str:
    from tqdm import tqdm

    return tqdm.format_interval(seconds)


@contextlib.contextmanager
def library_bars() -> Iterator[None]:
    """transformers', huggingface_hub's and datasets' progress bars (loading weights, de-quantizing a
    GGUF file, writing its copy, downloading, preparing a dataset) off while a run loads and scores,
    as they were afterwards; on with -v (ppl-eval's logger at DEBUG)."""
    if logging.getLogger("ppl_cli").isEnabledFor(logging.DEBUG):
        yield
        return
    import huggingface_hub.utils as hub
    import transformers.utils.logging as hf

    switches = [(hf.is_progress_bar_enabled, hf.disable_progress_bar, hf.enable_progress_bar)]
    switches.append((lambda: not hub.are_progress_bars_disabled(), hub.disable_progress_bars, hub.enable_progress_bars))
    try:
        import datasets.utils.logging as ds

        switches.append((ds.is_progress_bar_enabled, ds.disable_progress_bar, ds.enable_progress_bar))
    except ImportError:
        pass
    were = [enabled() for enabled, _, _ in switches]
    for _, off, _ in switches:
        off()
    try:
        yield
    finally:
        for was, (_, _, on) in zip(were, switches):
            if was:
                on()
