"""Tokenized documents -> per-document rows: windows batched through the scorer, one row a document.

Consecutive documents are scored in groups of about GROUP_BATCHES batches (their windows sorted by
length and packed together), and each group's rows are handed on as soon as it is done. Groups
depend only on the documents' lengths, so a resumed run skips finished groups whole and scores
the rest with exactly the batches an uninterrupted run would use.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..engine.conventions import Windowing, conditional_windows, first_token_replacement, windows
from ..engine.tokenizing import Tokenized
from .kl_statistics import REFERENCE_SUMS, document_histograms
from .metrics import count_bytes, count_words, unit_metrics
from .run_directory import CONTEXTS_STEM, REFERENCE_STEM
from .signals import document_signals

GROUP_BATCHES = 8  # a group of documents fills about this many batches before its rows are written


@dataclass
class Tally:
    """What one process did: documents scored now, skipped (by group; None: not grouped), and tokens scored now."""

    scored: int = 0
    skipped: Counter = field(default_factory=Counter)
    tokens: int = 0


@dataclass
class RowSink:
    """Where score_stream hands its rows: append(rows, side) stores a group's new rows, `side`
    holding per-document lines for the files beside documents.jsonl (contexts.jsonl,
    reference.jsonl); on_rows(rows), when given, gets every row in input order as soon as it is
    final, scored now or by an earlier run (--jsonl)."""

    append: Callable[[list[dict], dict[str, list[dict]]], None]
    on_rows: Callable[[list[dict]], None] | None = None

    def final(self, rows: list[dict]) -> None:
        if self.on_rows is not None and rows:
            self.on_rows(rows)


def score_stream(
    scorer, items: Iterable[Tokenized], windowing: Windowing, sink: RowSink, progress, stop, retokenize, write_tokens=None, signals_k: float | None = None
) -> Tally:
    """Score every document of `items` not done yet, a group at a time, and hand each group's rows
    to `sink`, after write_tokens([(index, positions, per-token values)]) when tokens are saved.
    `signals_k`: add each document's --signals with that k (the scorer keeps entropy and z).

    `stop.check()` runs after every batch (a signal ends the run there); an error from `items`
    (bad input further on) is raised after the documents read before it are scored and written.
    """
    tally = Tally()

    def on_tokens(n):
        progress.update(tokens=n)
        stop.check()

    def score_group(group: list[Tokenized]):
        fresh = [item for item in group if item.done is None]
        if not fresh:  # finished by an earlier run
            progress.update(tokens=sum(item.done["tokens"] for item in group), documents=len(group), scored=False)
            sink.final([item.done for item in group])
            return
        if len(fresh) < len(group):  # a group an earlier run left half-written: score it whole again
            group = [item if item.ids is not None else retokenize(item) for item in group]
        sequences = [item.ids for item in group] + [ids for item in group for ids in item.alone]  # --ifd: each continuation alone too
        spans = [item.spans for item in group] + [None] * (len(sequences) - len(group))
        scores = score_documents(scorer, sequences, windowing, on_tokens, spans)
        alone = iter(scores[len(group) :])
        fresh_scores = [(item, s, [next(alone) for _ in item.alone]) for item, s in zip(group, scores[: len(group)])]
        fresh_scores = [(item, s, a) for item, s, a in fresh_scores if item.done is None]
        values = [(item, s, token_values(s)) for item, s, _ in fresh_scores]
        rows = [document_result(item, s, windowing, a) for item, s, a in fresh_scores]
        if signals_k is not None:
            for row, (item, _, v) in zip(rows, values):
                row.update(document_signals(v, scored_texts(item), signals_k, row))
        side = {CONTEXTS_STEM: [context_line(item.index, s, v["nll"]) for item, s, v in values]}
        if scorer.reference is not None:
            side[REFERENCE_STEM] = [document_histograms(item.index, v) for item, _, v in values]
        if write_tokens is not None:
            write_tokens([(item, scored_positions(s), v) for item, s, v in values])
        sink.append(rows, side)
        new = iter(rows)
        sink.final([item.done or next(new) for item in group])
        tally.scored += len(rows)
        tally.tokens += sum(row["tokens"] for row in rows)
        progress.update(documents=len(group))

    for group in document_groups(items, scorer.max_batch_tokens * GROUP_BATCHES, tally):
        score_group(group)
    return tally


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
            tally.skipped[item.document.group] += 1
            continue
        group.append(item)
        size += item.length
        if size >= budget:
            yield group
            group, size = [], 0
    if group:
        yield group


def score_documents(
    scorer, sequences: Sequence, windowing: Windowing, on_tokens: Callable[[int], None] | None, spans: Sequence | None = None
) -> list[list[tuple]]:
    """For each token sequence, its windows with what the scorer found (Scored), in order. A
    sequence with scored `spans` (a document given a context) gets the conditional windows."""
    import torch

    from ..engine.scorer import Job

    replacement = first_token_replacement(windowing)
    jobs, owners = [], []
    for d, ids in enumerate(sequences):
        tokens = torch.as_tensor(ids, dtype=torch.long)  # [n]
        scored_spans = spans[d] if spans is not None else None
        for w in windows(len(ids), windowing) if scored_spans is None else conditional_windows(scored_spans, windowing):
            span = tokens[w.begin : w.end]
            if replacement is not None:
                span = span.clone()
                span[0] = replacement
            # Read the whole span when it fits the window (the recipe's shape); lm-eval's spans are
            # window + 1 tokens, of which the model reads the first `window`, as lm-eval does.
            jobs.append(Job(span, w.score_from - w.begin, min(len(span), windowing.window)))
            owners.append((d, w))
    scored: list[list[tuple]] = [[] for _ in sequences]
    for (d, w), result in zip(owners, scorer.score(jobs, on_tokens)):
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
    words = sum(count_words(text, windowing.convention) for text in counted)
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
    """The text a document's words, bytes and zlib size count: all of it, or what is scored of it."""
    return item.counted if item.counted is not None else (item.document.text,)


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
