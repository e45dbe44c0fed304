"""Tokenized documents -> per-document rows: windows batched through the engine, one row a document.

Consecutive documents are planned in groups of about GROUP_BATCHES batches (their windows sorted by
length and packed together), and the batches of a group run in the order of the first document
each holds, so documents finish in input order as the batches go. A document's row is handed on
(written, printed) once its last window is scored and every document before it is done: at once,
or with the other rows that finish within FLUSH_S seconds (one write, one fsync and one token part
for all of them). Groups and their batches depend only on the documents' lengths, so a resumed run
skips finished groups whole and scores the rest with exactly the batches an uninterrupted run uses.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..engine.base import WindowError
from ..engine.conventions import Windowing, conditional_windows, first_token_replacement, windows
from ..engine.tokenizing import Tokenized, digest_hex
from ..engine.windows import Window
from ..errors import PplError
from .kl_statistics import REFERENCE_SUMS, document_histograms
from .metrics import count_bytes, count_words, unit_metrics
from .run_directory import CONTEXTS_STEM, REFERENCE_STEM
from .signals import document_signals
from .word_export import WordExport

GROUP_BATCHES = 8  # a group of documents fills about this many batches
FLUSH_S = 2.0  # a finished document's row waits at most about this long for the rows finishing after it


@dataclass
class Tally:
    """What one process did: documents scored now, skipped (by group; None: not grouped), of those the
    ones too short for --lengths, and tokens scored now."""

    scored: int = 0
    skipped: Counter = field(default_factory=Counter)
    short: int = 0
    longest_short: int = 0  # the most tokens of a document too short for --lengths
    tokens: int = 0


@dataclass
class RowSink:
    """Where score_stream hands its rows: append(rows, side) stores new rows, `side` holding
    per-document lines for the files beside documents.jsonl (contexts.jsonl, reference.jsonl);
    on_rows(rows), when given, gets every row in input order as soon as it is final, scored now or
    by an earlier run (--jsonl)."""

    append: Callable[[list[dict], dict[str, list[dict]]], None]
    on_rows: Callable[[list[dict]], None] | None = None

    def final(self, rows: list[dict]) -> None:
        if self.on_rows is not None and rows:
            self.on_rows(rows)


@dataclass(frozen=True)
class RowExtras:
    """What a document's row gets besides its metrics, each None when the run does not ask for it."""

    write_tokens: Callable[[list[tuple]], None] | None = None  # --save-tokens: [(item, positions, values)] -> one Parquet part
    signals_k: float | None = None  # --signals, with this k (the engine keeps entropy and z, where it can)
    words: WordExport | None = None  # --save-words (with the correction the engine keeps the word-start classes, and those after the last token)


class Flusher:
    """When the rows that are ready get written: after a batch, once FLUSH_S seconds have passed
    since the last write, or sooner when the next batch is expected to end after that (so that a
    slow batch never holds finished rows back). The expectation is the last batch's time per padded
    token times the next batch's padded tokens."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic):
        self.interval, self.clock = interval, clock
        self.last = clock()
        self.per_token = 0.0

    def timed(self, padded_tokens: int, seconds: float) -> None:
        self.per_token = seconds / max(padded_tokens, 1)

    def due(self, next_padded_tokens: int) -> bool:
        return self.clock() - self.last + next_padded_tokens * self.per_token >= self.interval

    def wrote(self) -> None:
        self.last = self.clock()


class Part(NamedTuple):
    """A job's place in its group: the document (its position in the group), which of its sequences
    (`pass_` of the document's own passes, or `alone`: --ifd's continuation scored alone), the window."""

    doc: int
    pass_: int
    alone: int | None
    window: Window | None


def score_stream(
    engine, items: Iterable[Tokenized], windowing: Windowing, sink: RowSink, progress, stop, retokenize, extras: RowExtras = RowExtras(), tally: Tally | None = None
) -> Tally:
    """Score every document of `items` not done yet and hand each one's row to `sink` (after its
    tokens to extras.write_tokens) as it finishes, in input order.

    `stop.check()` runs after every batch (a signal ends the run there, after the rows that are
    ready are written); an error from `items` (bad input further on) is raised after the documents
    read before it are scored and written. `tally`: where what is done is counted (the caller's, so
    that it is known after a stop too).
    """
    tally = tally if tally is not None else Tally()
    flusher = Flusher(FLUSH_S)
    for group in document_groups(items, engine.max_batch_tokens * GROUP_BATCHES, tally):
        if all(item.done is not None for item in group):  # finished by an earlier run
            progress.update(tokens=sum(item.done["tokens"] for item in group), documents=len(group), scored=False)
            sink.final([item.done for item in group])
            continue
        redone = frozenset(d for d, item in enumerate(group) if item.done is not None)
        if redone:  # a group an earlier run left half-written: score it whole again (its finished rows, counted as done already, once)
            progress.update(tokens=sum(group[d].done["tokens"] for d in redone), scored=False)
            group = [item if item.ids is not None else retokenize(item) for item in group]
        GroupScoring(group, engine, windowing, sink, progress, extras, tally, flusher, redone).run(stop)
    return tally


class GroupScoring:
    """One group's jobs, run batch by batch, its documents handed on as they finish."""

    def __init__(
        self, group: list[Tokenized], engine, windowing: Windowing, sink: RowSink, progress, extras: RowExtras, tally: Tally, flusher: Flusher,
        redone: frozenset[int] = frozenset(),
    ):  # fmt: skip
        """`redone`: the documents (positions in the group) an earlier run finished, scored again but not counted again."""
        self.group, self.engine, self.windowing, self.redone = group, engine, windowing, redone
        self.sink, self.progress, self.extras, self.tally, self.flusher = sink, progress, extras, tally, flusher
        self.jobs, self.parts = [], []
        self.passes = []  # each document's number of passes
        self.doc_jobs: list[list[int]] = [[] for _ in group]  # each document's jobs, in order
        for d, item in enumerate(group):
            passes = item.passes(windowing)
            self.passes.append(len(passes))
            for p, (ids, pass_windows) in enumerate(passes):
                self.add(ids, pass_windows, Part(d, p, None, None), tail=extras.words is not None and p == len(passes) - 1)
            for k, ids in enumerate(item.alone):  # --ifd: each continuation alone too
                self.add(ids, windows(len(ids), windowing), Part(d, 0, k, None))
        self.results: list = [None] * len(self.jobs)
        self.remaining = [len(jobs) for jobs in self.doc_jobs]
        self.done = 0  # documents of the group handed on
        self.ready = 0  # documents after those whose every job is scored

    def add(self, ids, pass_windows: list[Window], where: Part, tail: bool = False) -> None:
        """The jobs of a pass over ids; `tail`: its last window also scores the word-start classes after the last token."""
        for k, w in enumerate(pass_windows):
            self.doc_jobs[where.doc].append(len(self.jobs))
            self.jobs.append(window_job(ids, w, self.windowing, tail and k == len(pass_windows) - 1))
            self.parts.append(where._replace(window=w))

    def run(self, stop) -> None:
        """Score the group's batches (in the order of the first document each holds), handing
        documents on as they finish; on a stop or an error, the finished ones are handed on first."""
        batches = sorted(self.engine.plan(self.jobs), key=lambda batch: min(self.parts[i].doc for i in batch))
        upcoming = {tuple(batch): k for k, batch in enumerate(batches)}
        try:
            started = time.perf_counter()
            for batch, results in self.engine.stream(self.jobs, batches, stop):
                for i, scored in zip(batch, results):
                    self.results[i] = scored
                    self.remaining[self.parts[i].doc] -= 1
                self.flusher.timed(padded(self.jobs, batch), time.perf_counter() - started)
                self.progress.update(tokens=sum(self.jobs[i].scored for i in batch if self.parts[i].doc not in self.redone))
                while self.done + self.ready < len(self.group) and not self.remaining[self.done + self.ready]:
                    self.ready += 1
                k = upcoming[tuple(batch)]
                following = padded(self.jobs, batches[k + 1]) if k + 1 < len(batches) else 0
                if self.ready and (stop.signum is not None or self.flusher.due(following)):
                    self.hand_on()
                stop.check()
                started = time.perf_counter()
        except WindowError as e:  # named by its document and window, which the engine does not know
            item, window = self.group[self.parts[e.job].doc], self.parts[e.job].window
            raise PplError(f"document {item.index} ({item.document.id}), the window of tokens {window.begin}-{window.end}: {e}", e.exit_code) from None
        finally:
            self.hand_on()

    def hand_on(self) -> None:
        """The ready documents' rows (and tokens, words and lines beside them) written and handed on."""
        if not self.ready:
            return
        finished = [self.collected(d) for d in range(self.done, self.done + self.ready)]
        rows, side = self.new_rows([f for f in finished if f[0].done is None])
        if rows:
            self.sink.append(rows, side)
        new = iter(rows)
        self.sink.final([item.done or next(new) for item, _, _ in finished])
        self.tally.scored += len(rows)
        self.tally.tokens += sum(row["tokens"] for row in rows)
        self.progress.update(documents=len(finished))
        self.done += self.ready
        self.ready = 0
        self.flusher.wrote()

    def collected(self, d: int) -> tuple[Tokenized, list[list[tuple]], list[list[tuple]]]:
        """Document d, its passes' and its continuations' (--ifd) windows with what the engine found, in order."""
        passes: list[list[tuple]] = [[] for _ in range(self.passes[d])]
        alone: list[list[tuple]] = [[] for _ in self.group[d].alone]
        for i in self.doc_jobs[d]:
            part = self.parts[i]
            (alone[part.alone] if part.alone is not None else passes[part.pass_]).append((part.window, self.results[i]))
            self.results[i] = None  # its per-token values are not held past its document
        return self.group[d], passes, alone

    def new_rows(self, fresh: list[tuple]) -> tuple[list[dict], dict[str, list[dict]]]:
        """The rows of documents scored now and their lines beside documents.jsonl; their tokens'
        and words' Parquet parts written (before the rows, so that a row on disk has them)."""
        rows = [document_result(item, passes[-1], self.windowing, alone) for item, passes, alone in fresh]
        values = [(item, passes[-1], token_values(passes[-1])) for item, passes, _ in fresh]
        for row, (item, passes, _), (_, scored, kept) in zip(rows, fresh, values):
            if self.windowing.lengths:
                row["lengths"] = length_sums(item, passes, self.windowing)
            if self.extras.signals_k is not None:
                row.update(document_signals(kept, scored_texts(item), self.extras.signals_k, row))
        side = {CONTEXTS_STEM: [{**context_line(item.index, s, v["nll"]), "digest": digest_hex(item.index, item.document)} for item, s, v in values]}
        if self.engine.reference is not None:
            side[REFERENCE_STEM] = [document_histograms(item.index, v) for item, _, v in values]
        if self.extras.words is not None and values:
            tables = []
            for row, (item, s, v) in zip(rows, values):
                table, sums = self.extras.words.document(item, v, s[-1][1].tail)
                row.update(sums)
                tables.append(table)
            self.extras.words.write(tables)
        if self.extras.write_tokens is not None and values:
            self.extras.write_tokens([(item, scored_positions(s), v) for item, s, v in values])
        return rows, side


def padded(jobs: Sequence, batch: list[int]) -> int:
    """Tokens a batch's forward pass reads, padding included."""
    return len(batch) * max(jobs[i].reads for i in batch)


def window_job(ids, w: Window, windowing: Windowing, tail: bool = False):
    """The engine's job for window w of a token sequence: its span (llama-cpp: the first token
    replaced by BOS), the context before the scored tokens, and the tokens the model reads."""
    import torch

    from ..engine.base import Job

    span = torch.as_tensor(ids[w.begin : w.end], dtype=torch.long)  # [m]
    replacement = first_token_replacement(windowing)
    if replacement is not None:
        span = span.clone()
        span[0] = replacement
    # Read the whole span when it fits the window (the recipe's shape); lm-eval's spans are
    # window + 1 tokens, of which the model reads the first `window`, as lm-eval does.
    return Job(span, w.score_from - w.begin, min(len(span), windowing.window), tail)


def document_groups(items: Iterable[Tokenized], budget: int, tally: Tally) -> Iterator[list[Tokenized]]:
    """Consecutive documents with something to score, about `budget` tokens a group; the skipped are counted."""
    group, size = [], 0
    iterator = iter(items)
    while True:
        try:
            item = next(iterator, None)
        except Exception:
            if group:  # score what was read before the bad input, then report it
                yield group
            raise
        if item is None:
            break
        if item.skipped:
            if not item.bad:
                tally.skipped[item.document.group] += 1
                tally.short += bool(item.short)
                tally.longest_short = max(tally.longest_short, item.short)
            continue
        group.append(item)
        size += item.length
        if size >= budget:
            yield group
            group, size = [], 0
    if group:
        yield group


def score_documents(
    engine, sequences: Sequence, windowing: Windowing, on_tokens: Callable[[int], None] | None, spans: Sequence | None = None
) -> list[list[tuple]]:
    """For each token sequence, its windows with what the engine found (Scored), in order, all at
    once (benchmarks and tests; runs go through score_stream). A sequence with scored `spans` (a
    document given a context) gets the conditional windows."""
    jobs, owners = [], []
    for d, ids in enumerate(sequences):
        scored_spans = spans[d] if spans is not None else None
        for w in windows(len(ids), windowing) if scored_spans is None else conditional_windows(scored_spans, windowing):
            jobs.append(window_job(ids, w, windowing))
            owners.append((d, w))
    scored: list[list[tuple]] = [[] for _ in sequences]
    for (d, w), result in zip(owners, engine.score(jobs, on_tokens)):
        scored[d].append((w, result))
    return scored


def scored_positions(scored: list[tuple]) -> np.ndarray:
    """The position in its token sequence of each scored token of a document, in order."""
    return np.concatenate([np.arange(w.score_from, w.end) for w, _ in scored])


def context_buckets(scored: list[tuple]) -> np.ndarray:
    """Each scored token's bucket of context: floor(log2(tokens read before it in its window))."""
    context = np.concatenate([np.arange(w.score_from, w.end) - w.begin for w, _ in scored])  # >= 1
    return np.floor(np.log2(context)).astype(np.int64)


def context_line(index: int, scored: list[tuple], nll: np.ndarray) -> dict:
    """A document's line in contexts.jsonl: NLL sums and token counts by context bucket (1, 2-3, 4-7, ...)."""
    buckets = context_buckets(scored)
    return {
        "index": index,
        "nll": [round(x, 6) for x in np.bincount(buckets, weights=nll.astype(np.float64)).tolist()],
        "tokens": np.bincount(buckets).tolist(),
    }


def token_values(scored: list[tuple]) -> dict[str, np.ndarray]:
    """A document's kept per-token values, its windows' joined in order."""
    return {name: np.concatenate([s.tokens[name] for _, s in scored]) for name in scored[0][1].tokens}


def summed(scored: list[tuple]) -> dict[str, float]:
    """A document's sums over its windows."""
    total: dict[str, float] = {}
    for _, s in scored:
        for key, value in s.sums.items():
            total[key] = total.get(key, 0.0) + value
    return total


def document_result(item: Tokenized, scored: list[tuple], windowing: Windowing, alone: list[list[tuple]] = ()) -> dict:
    """A document's metrics. Words and bytes come from the original text, or for a document given a
    context from what is scored of it (the continuation, the scored turns' contents)."""
    doc = item.document
    sums = summed(scored)
    tokens = sum(w.end - w.score_from for w, _ in scored)
    counted = scored_texts(item)
    words = len(doc.words) if doc.words is not None else sum(count_words(text, windowing.convention) for text in counted)
    n_bytes = sum(count_bytes(text) for text in counted)
    row = {"index": item.index, "id": doc.id, **({"group": doc.group} if doc.group is not None else {})}
    row.update(unit_metrics(sums["nll_sum"], tokens, words, n_bytes))
    if item.spans is not None:
        row["context_tokens"] = item.length - tokens
        if item.spans[0].turn >= 0:
            row["turns"] = len({s.turn for s in item.spans})
        row["context_cut"] = context_cut(scored, item.spans)
    if alone:
        unconditional = sum(summed(windows_of_span)["nll_sum"] for windows_of_span in alone)
        row["unconditional_nll_sum"] = unconditional
        row["ifd"] = row["nll_sum"] / unconditional if unconditional > 0 else None
    if windowing.convention == "hf-recipe":
        row.update(published_normalisation(scored))
    if windowing.convention == "llama-cpp":
        row["nll_sq_sum"] = sums["nll_sq_sum"]
    if "kld_sum" in sums:
        row.update({key: sums[key] for key in REFERENCE_SUMS})
        row["same_top"] = int(round(row["same_top"]))
    return row


def scored_texts(item: Tokenized) -> tuple[str, ...]:
    """The text a document's words, bytes and zlib size count: all of it, what is scored of it, or
    (the --lengths prefix protocol) the text of its cut."""
    if item.counted is not None:
        return item.counted
    if item.cuts is not None:
        return (item.document.text[: max(c for c in item.cuts if c is not None)],)
    return (item.document.text,)


def length_sums(item: Tokenized, passes: list[list[tuple]], windowing: Windowing) -> dict:
    """A --lengths document's NLL, scored tokens, words and bytes at each length (null where it is
    shorter): with a stride, each length's pass; else its prefix of L tokens, which scores L - 1
    tokens, from that length's pass or as a prefix sum of the one pass (float64, in token order)."""
    text = item.document.text
    out: dict[str, list] = {"nll": [], "tokens": [], "words": [], "bytes": []}
    reached = iter(passes)
    prefix_sums = None
    if windowing.protocol == "prefix" and not windowing.per_length:
        prefix_sums = np.cumsum(token_values(passes[0])["nll"].astype(np.float64))
    for length, cut in zip(windowing.lengths, item.cuts):
        if cut is None:
            for values in out.values():
                values.append(None)
            continue
        if windowing.protocol == "sliding" or windowing.per_length:
            scored = next(reached)
            nll, tokens = summed(scored)["nll_sum"], sum(w.end - w.score_from for w, _ in scored)
        else:
            nll, tokens = float(prefix_sums[length - 2]), length - 1
        out["nll"].append(nll)
        out["tokens"].append(tokens)
        out["words"].append(count_words(text[:cut]))
        out["bytes"].append(count_bytes(text[:cut]))
    return out


def context_cut(scored: list[tuple], spans) -> bool:
    """Whether the window of some span's first token could not read everything before it."""
    starts = {s.start for s in spans}
    return any(w.begin > 0 for w, _ in scored if w.score_from in starts)


def published_normalisation(scored: list[tuple]) -> dict:
    """The guide's sum: each window's mean loss times (valid labels - 1), valid labels counted
    before the model's internal shift, so every window after the first loses one token."""
    nll, tokens, prev_end = 0.0, 0, 0
    for w, result in scored:
        window_nll = result.sums["nll_sum"]
        valid = min(w.end - prev_end, w.end - w.begin)
        nll += window_nll / (w.end - w.score_from) * (valid - 1)
        tokens += valid - 1
        prev_end = w.end
    return {"published_nll_sum": nll, "published_tokens": tokens}
