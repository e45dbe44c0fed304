"""Documents -> token ids, in a background thread that feeds the scorer through a bounded queue.

Reading, parsing and tokenizing overlap the forward passes, so a GPU does not wait on the
tokenizer, and at most QUEUE_BATCHES batches of documents are in flight whatever the size of the
corpus. On a resumed run the documents already done are not tokenized again: their length comes
from the row an earlier run wrote.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..data.documents import digest, skippable
from ..data.records import Document
from ..errors import EXIT_DATA, PplError
from .conventions import JOIN, JOINED_ID, Windowing, conditional_windows, prefix, text_to_score, windows
from .layouts import Layout
from .windows import Window, sliding_windows

TOKENIZE_BATCH = 256  # documents per tokenizer call
TOKENIZE_CHARS = 1 << 20  # ... or fewer, when they are long
QUEUE_BATCHES = 4  # tokenized batches waiting for the scorer


class TokenSpan(NamedTuple):
    """Tokens [start, end) of a sequence are scored; `turn` and `role` name the message they belong to (-1, None: a continuation)."""

    start: int
    end: int
    turn: int = -1
    role: str | None = None


class Tokenized(NamedTuple):
    """A document ready to score: its token ids (the convention's prefix first) or, when an earlier
    run scored it, that run's row and the length of its sequence.

    A document scored given a context has `spans`, the scored tokens (None: every token after the
    first), `counted`, the texts whose words and bytes are its own, and with --ifd `alone`, each
    span's tokens after a prefix token, to be scored as plain documents. Under --lengths, `cuts`
    holds for each length the character of the text where that length's tokens end (None: the
    document is shorter), and a document too short to take part is skipped with `short`.
    """

    index: int
    document: Document
    ids: np.ndarray | None  # int32; None when done or when there is nothing to score
    length: int  # tokens in the sequence; 0 when it has nothing to score (skipped)
    done: dict | None = None  # its row in documents.jsonl, written by an earlier run
    spans: tuple[TokenSpan, ...] | None = None
    counted: tuple[str, ...] | None = None
    alone: tuple[np.ndarray, ...] = ()
    cuts: tuple[int | None, ...] | None = None
    short: int = 0  # --lengths: the tokens of a document too short to take part (0: it is not)
    offsets: np.ndarray | None = None  # [t, 2] int32: each text token's characters (start, end), for --save-words
    bad: bool = False  # --skip-bad-records: passed over (counted as a bad record, not as skipped)

    @property
    def skipped(self) -> bool:
        return self.length == 0

    def passes(self, windowing: Windowing) -> list[tuple[np.ndarray, list[Window]]]:
        """The document's passes over its own tokens, each (token ids, windows); the last is the one
        its row's metrics, tokens and signals come from. --lengths: with a stride, a pass of sliding
        windows per length; else its prefix cut to the largest length it reaches, read in one pass
        (its shorter prefixes' sums are taken from that pass), or in a pass per length when the
        model's logits depend on the input's length."""
        if self.spans is not None:
            return [(self.ids, conditional_windows(self.spans, windowing))]
        if windowing.protocol == "sliding":
            return [(self.ids, sliding_windows(len(self.ids), length, windowing.stride)) for length in windowing.lengths]
        if windowing.protocol == "prefix" and windowing.per_length:
            return [(self.ids, [Window(0, length, 1)]) for length, cut in zip(windowing.lengths, self.cuts) if cut is not None]
        return [(self.ids, windows(len(self.ids), windowing))]

    def work(self, windowing: Windowing) -> int:
        """The tokens scoring it scores (its passes and --ifd's continuations alone): what progress counts."""
        if self.done is not None:
            return self.done["tokens"]
        if self.skipped:
            return 0
        own = sum(w.end - w.score_from for _, ws in self.passes(windowing) for w in ws)
        return own + sum(w.end - w.score_from for ids in self.alone for w in windows(len(ids), windowing))


class Conditional(NamedTuple):
    """How documents given a context become sequences: their layout as text (layouts.py), the
    prefix token a pair's sequence starts with, and --ifd's prefix for a continuation alone."""

    layout: Callable[[Document], Layout]
    mode: str  # "pairs", "conversations" or "chat-wrap"
    pair_prefix: list[int]  # sliding: [BOS] under --add-bos; lm-eval: [] (its prefix token only before an empty context)
    empty_context_prefix: list[int]
    alone_prefix: int | None  # --ifd: the token before a continuation scored alone; None: no --ifd


class Encoder:
    """texts -> token ids without special tokens, equal to tokenizer(texts, add_special_tokens=False),
    and with_offsets(texts): each text's ids and their characters (start, end) in it.

    A fast tokenizer's Rust backend is called directly (encode_batch_fast skips the character
    offsets), after one call through transformers has set it up as every call does (no truncation,
    no padding); other tokenizers go through transformers, and have no offsets.
    """

    def __init__(self, tokenizer, offsets: bool = False):
        """`offsets`: documents keep their tokens' characters (Tokenized.offsets), for --save-words."""
        self.tokenizer = tokenizer
        self.offsets = offsets
        self.backend = getattr(tokenizer, "_tokenizer", None)
        if self.backend is not None and hasattr(self.backend, "encode_batch"):
            tokenizer(["ppl-eval"], add_special_tokens=False)
        else:
            self.backend = None

    @property
    def has_offsets(self) -> bool:
        return self.backend is not None

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self.backend is not None:
            fast = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            return [e.ids for e in fast(texts, add_special_tokens=False)]
        import transformers

        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # "sequence longer than the model's maximum"
        try:
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        finally:
            transformers.logging.set_verbosity(verbosity)

    def with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        return [(e.ids, e.offsets) for e in self.backend.encode_batch(texts, add_special_tokens=False)]


def token_ids(encode: Encoder, texts: list[str], windowing: Windowing) -> list[np.ndarray]:
    """Each text on its own, the convention's prefix first, as int32 (4 bytes a token)."""
    head = prefix(windowing)
    return [np.array(head + ids, dtype=np.int32) for ids in encode([text_to_score(t, windowing) for t in texts])]


def has_tokens_to_score(length: int, windowing: Windowing) -> bool:
    return bool(windows(length, windowing))


class BadDocument(Exception):
    """A document that cannot become a sequence, at position `at` of its batch: the ones before it are still scored."""

    def __init__(self, at: int, error: PplError):
        super().__init__(str(error))
        self.at, self.error = at, error


def tokenize_documents(
    documents: Iterable[tuple[int, Document]], encode, windowing: Windowing, done: Iterator[tuple[dict, str | None]],
    conditional: Conditional | None = None, bad=None,
) -> Iterator[list[Tokenized]]:  # fmt: skip
    """Batches of tokenized documents in input order; documents done by an earlier run pass by
    untokenized (checked against their rows: with_done_rows), empty ones are marked skipped. Bad input
    (unreadable further on, a conversation its template cannot render) ends the stream with its
    error, after the documents before it; with `bad` (--skip-bad-records: data.records.BadRecords)
    a document that cannot become a sequence is passed over, counted there, instead."""
    pending: list[tuple[int, Document, dict | None]] = []
    chars = 0
    rows = with_done_rows(documents, done)

    def flush(items) -> Iterator[list[Tokenized]]:
        batch: list[Tokenized] = []
        while items:
            try:
                batch += tokenize_batch(items, encode, windowing, conditional)
                break
            except BadDocument as e:
                if e.at:
                    batch += tokenize_batch(items[: e.at], encode, windowing, conditional)
                if bad is None:
                    yield batch
                    raise skippable(e.error) from None
                index, doc, _ = items[e.at]
                bad.add(doc.where, str(e.error))
                batch.append(Tokenized(index, doc, None, 0, bad=True))
                items = items[e.at + 1 :]
        yield batch

    while True:
        try:
            item = next(rows, None)
        except Exception:
            if pending:  # the documents read before bad input are scored, then the error is reported
                yield from flush(pending)
            raise
        if item is None:
            break
        pending.append(item)
        chars += text_size(item[1]) if item[2] is None else 0
        if len(pending) >= TOKENIZE_BATCH or chars >= TOKENIZE_CHARS:
            yield from flush(pending)
            pending, chars = [], 0
    if pending:
        yield from flush(pending)


def digest_hex(index: int, doc: Document) -> str:
    """A document's digest as contexts.jsonl records it: the first 16 hex digits of data.documents.digest."""
    return f"{digest(index, doc):064x}"[:16]


def text_size(doc: Document) -> int:
    return len(doc.text) + len(doc.context or "") + sum(len(m["content"]) for m in doc.messages or ())


def with_done_rows(documents: Iterable[tuple[int, Document]], done: Iterator[tuple[dict, str | None]]) -> Iterator[tuple[int, Document, dict | None]]:
    """Each document with the row an earlier run wrote for it, or None. `done`: the finished rows in
    index order, each with the digest its document had then (None: not recorded), checked against
    the document as it is now; a finished row past the end of the data is an error too."""
    next_done = next(done, None)
    for index, doc in documents:
        while next_done is not None and next_done[0]["index"] < index:
            next_done = next(done, None)
        row, scored_digest = next_done if next_done is not None and next_done[0]["index"] == index else (None, None)
        if row is not None and (row["id"] != doc.id or scored_digest not in (None, digest_hex(index, doc))):
            what = f"has id {doc.id!r}, but {row['id']!r} in documents.jsonl" if row["id"] != doc.id else f"({doc.where}) is not the text that was scored"
            raise PplError(
                f"the data changed since the run in this output directory began: document {index} {what}; use --overwrite to start afresh",
                EXIT_DATA,
            )
        yield index, doc, row
    while next_done is not None and next_done[0]["index"] < getattr(documents, "count", 0):  # other ranks' rows
        next_done = next(done, None)
    if next_done is not None:
        raise PplError(
            f"the data changed since the run in this output directory began: it has no document {next_done[0]['index']} now,"
            " which that run scored; use --overwrite to start afresh",
            EXIT_DATA,
        )


def tokenize_batch(
    pending: list[tuple[int, Document, dict | None]], encode, windowing: Windowing, conditional: Conditional | None = None
) -> list[Tokenized]:
    if conditional is not None:
        return conditional_batch(pending, encode, conditional)
    if windowing.lengths:
        return length_batch(pending, encode, windowing)
    todo = [doc.text for _, doc, row in pending if row is None and doc.text.strip()]
    if encode.offsets:
        head = prefix(windowing)
        encoded = iter((np.array(head + ids, dtype=np.int32), np.array(offsets, dtype=np.int32).reshape(-1, 2)) for ids, offsets in encode.with_offsets(todo))
    else:
        encoded = iter((ids, None) for ids in token_ids(encode, todo, windowing))
    out = []
    for index, doc, row in pending:
        if row is not None:
            out.append(Tokenized(index, doc, None, done_length(row), row))
        elif not doc.text.strip():
            out.append(Tokenized(index, doc, None, 0))
        else:
            ids, offsets = next(encoded)
            scored = has_tokens_to_score(len(ids), windowing)
            out.append(Tokenized(index, doc, ids if scored else None, len(ids) if scored else 0, offsets=offsets))
    return out


def length_batch(pending: list[tuple[int, Document, dict | None]], encode: Encoder, windowing: Windowing) -> list[Tokenized]:
    """--lengths: each document's tokens (the prefix protocol: cut to the largest length it reaches)
    and where each length's tokens end in its text; documents with fewer than windowing.min_tokens
    tokens (the prefix protocol: or than the shortest length) are skipped as short."""
    todo = [doc.text for _, doc, row in pending if row is None and doc.text.strip()]
    encoded = iter(encode.with_offsets(todo))
    head = prefix(windowing)
    out = []
    for index, doc, row in pending:
        if row is not None:
            out.append(Tokenized(index, doc, None, done_length(row), row))
            continue
        if not doc.text.strip():
            out.append(Tokenized(index, doc, None, 0))
            continue
        ids, offsets = next(encoded)
        n = len(head) + len(ids)
        if n < windowing.needed_tokens:
            out.append(Tokenized(index, doc, None, 0, short=n))
            continue
        if windowing.protocol == "sliding":
            cuts = (len(doc.text),) * len(windowing.lengths)
        else:  # the text up to the end of a length's last token (no text before the first)
            cuts = tuple((offsets[length - 1 - len(head)][1] if length > len(head) else 0) if length <= n else None for length in windowing.lengths)
            n = max(length for length in windowing.lengths if length <= n)
        sequence = np.array(head + ids[: n - len(head)], dtype=np.int32)
        out.append(Tokenized(index, doc, sequence, n, cuts=cuts))
    return out



def boundaries(layout: Layout) -> list[int]:
    """The characters where spans begin or end, after the first, in order; the text's end last."""
    return sorted({c for s in layout.spans for c in (s.start, s.end) if c > 0} | {len(layout.text)})


def done_length(row: dict) -> int:
    """The length of the sequence an earlier run scored: its scored tokens and the rest it read."""
    return row["tokens"] + row.get("context_tokens", 1)  # a plain document: every token but the first is scored


def conditional_batch(pending: list[tuple[int, Document, dict | None]], encode, conditional: Conditional) -> list[Tokenized]:
    """Documents given a context: each one's layout, then one tokenizer call for every prefix of its
    text that ends at a span's boundary, and the text. The sequence is lm-evaluation-harness's
    pair rule applied at every boundary: the tokens of text[:c1], then those of text[:c2] past
    the first len(tokens of text[:c1]), and so on to the whole text; where the tokenizer merges
    nothing across a boundary this is the text's own tokenization."""
    layouts: list[Layout | None] = []
    for at, (_, doc, row) in enumerate(pending):
        try:
            layouts.append(None if row is not None or doc.empty else conditional.layout(doc))
        except PplError as e:
            raise BadDocument(at, e) from None
    texts: list[str] = []
    for layout in layouts:
        if layout is not None:
            texts += [layout.text[:c] for c in boundaries(layout)]
    encoded = iter(encode(texts))
    out = []
    for (index, doc, row), layout in zip(pending, layouts):
        if row is not None:
            out.append(Tokenized(index, doc, None, done_length(row), row))
            continue
        if layout is None:
            out.append(Tokenized(index, doc, None, 0))
            continue
        head = conditional.empty_context_prefix if layout.context_empty else conditional.pair_prefix
        if conditional.mode != "pairs":
            head = []  # the chat template wrote every special token
        tokens, position = list(head), {0: len(head)}
        for c in boundaries(layout):
            prefix = next(encoded)
            tokens += prefix[len(tokens) - len(head) :]  # its tokens past the previous prefix's count
            position[c] = len(tokens)
        ids = np.array(tokens, dtype=np.int32)
        spans = []
        for s in layout.spans:
            start, end = max(1, position[s.start]), position[s.end]
            if end > start:
                spans.append(TokenSpan(start, end, s.turn, s.role))
        if not spans:
            out.append(Tokenized(index, doc, None, 0))
            continue
        alone = ()
        if conditional.alone_prefix is not None:
            alone = tuple(np.concatenate([[conditional.alone_prefix], ids[s.start : s.end]]).astype(np.int32) for s in spans)
        out.append(Tokenized(index, doc, ids, len(ids), None, tuple(spans), layout.counted, alone))
    return out


def joined_document(documents: Iterable[tuple[int, Document]], encode, windowing: Windowing, done: Iterator[tuple[dict, str | None]]) -> Iterator[list[Tokenized]]:
    """hf-recipe and llama-cpp score the corpus as one sequence, the documents joined: that text and
    its token ids are held in memory whole, as those tools do."""
    texts = [doc.text for _, doc in documents]
    if not texts:
        return
    doc = Document(JOINED_ID, JOIN.join(texts))
    row, scored_digest = next(done, (None, None))
    if row is not None and row["index"] == 0:
        if scored_digest not in (None, digest_hex(0, doc)):
            raise PplError("the data changed since the run in this output directory began; use --overwrite to start afresh", EXIT_DATA)
        yield [Tokenized(0, doc, None, row["tokens"], row)]
        return
    [ids] = token_ids(encode, [doc.text], windowing) if doc.text.strip() else [np.zeros(0, np.int32)]
    if windowing.convention == "llama-cpp" and len(ids) < 2 * windowing.window:
        raise PplError(
            f"the llama-cpp convention needs at least 2 x window = {2 * windowing.window} tokens, as"
            f" llama-perplexity does; the text has {len(ids)}",
            EXIT_DATA,
        )
    scored = has_tokens_to_score(len(ids), windowing)
    yield [Tokenized(0, doc, ids if scored else None, len(ids) if scored else 0)]


@dataclass
class ReadTally:
    """What the reader has seen so far, for the progress bar: documents, the tokens scoring them
    will score, the input's bytes read, and whether it has reached the end."""

    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    finished: bool = False


def tallied(batches: Iterator[list[Tokenized]], tally: ReadTally, counter, windowing: Windowing) -> Iterator[list[Tokenized]]:
    """`batches` as they are, counted into `tally` (with `counter.bytes`, the input read so far)."""
    for batch in batches:
        tally.documents += sum(not item.skipped for item in batch)
        tally.tokens += sum(item.work(windowing) for item in batch)
        tally.bytes = counter.bytes
        yield batch
    tally.finished = True


class Failure(NamedTuple):
    error: BaseException


END = object()


@contextmanager
def background(batches: Iterator[list[Tokenized]]) -> Iterator[Iterator[Tokenized]]:
    """Run `batches` in a thread ahead of the consumer, at most QUEUE_BATCHES ahead.

    An error in the thread reaches the consumer after every document read before it; leaving the
    block stops the thread.
    """
    ready: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(END)
        except BaseException as e:  # handed to the consumer, raised there
            put(Failure(e))

    def consume() -> Iterator[Tokenized]:
        while True:
            item = ready.get()
            if item is END:
                return
            if isinstance(item, Failure):
                raise item.error
            yield from item

    thread = threading.Thread(target=produce, name="ppl-eval-tokenize", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        stop.set()
        thread.join(timeout=5)
