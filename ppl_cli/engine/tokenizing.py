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
from typing import NamedTuple

import numpy as np

from ..data.records import Document
from ..errors import EXIT_DATA, PplError
from .conventions import JOIN, JOINED_ID, Windowing, prefix, text_to_score, windows
from .layouts import Layout

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
    span's tokens after a prefix token, to be scored as plain documents.
    """

    index: int
    document: Document
    ids: np.ndarray | None  # int32; None when done or when there is nothing to score
    length: int  # tokens in the sequence; 0 when it has nothing to score (skipped)
    done: dict | None = None  # its row in documents.jsonl, written by an earlier run
    spans: tuple[TokenSpan, ...] | None = None
    counted: tuple[str, ...] | None = None
    alone: tuple[np.ndarray, ...] = ()

    @property
    def skipped(self) -> bool:
        return self.length == 0


class Conditional(NamedTuple):
    """How documents given a context become sequences: their layout as text (layouts.py), the
    prefix token a pair's sequence starts with, and --ifd's prefix for a continuation alone."""

    layout: Callable[[Document], Layout]
    mode: str  # "pairs", "conversations" or "chat-wrap"
    pair_prefix: list[int]  # sliding: [BOS] under --add-bos; lm-eval: [] (its prefix token only before an empty context)
    empty_context_prefix: list[int]
    alone_prefix: int | None  # --ifd: the token before a continuation scored alone; None: no --ifd


def batch_encoder(tokenizer) -> Callable[[list[str]], list[list[int]]]:
    """texts -> token ids without special tokens, equal to tokenizer(texts, add_special_tokens=False).

    A fast tokenizer's Rust backend is called directly (encode_batch_fast skips the character
    offsets), after one call through transformers has set it up as every call does (no truncation,
    no padding); other tokenizers go through transformers.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch"):

        def encode(texts):
            import transformers

            verbosity = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()  # "sequence longer than the model's maximum"
            try:
                return tokenizer(texts, add_special_tokens=False)["input_ids"]
            finally:
                transformers.logging.set_verbosity(verbosity)

        return encode
    tokenizer(["ppl-eval"], add_special_tokens=False)
    fast = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return lambda texts: [e.ids for e in fast(texts, add_special_tokens=False)]


def token_ids(encode, texts: list[str], windowing: Windowing) -> list[np.ndarray]:
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
    documents: Iterable[tuple[int, Document]], encode, windowing: Windowing, done: Iterator[dict], conditional: Conditional | None = None
) -> Iterator[list[Tokenized]]:
    """Batches of tokenized documents in input order; documents done by an earlier run pass by
    untokenized (their id is checked against the row), empty ones are marked skipped. Bad input
    (unreadable further on, a conversation its template cannot render) ends the stream with its
    error, after the documents before it."""
    pending: list[tuple[int, Document, dict | None]] = []
    chars = 0
    rows = with_done_rows(documents, done)

    def flush(items) -> Iterator[list[Tokenized]]:
        try:
            batch = tokenize_batch(items, encode, windowing, conditional)
        except BadDocument as e:
            if e.at:
                yield tokenize_batch(items[: e.at], encode, windowing, conditional)
            raise e.error from None
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


def text_size(doc: Document) -> int:
    return len(doc.text) + len(doc.context or "") + sum(len(m["content"]) for m in doc.messages or ())


def with_done_rows(documents: Iterable[tuple[int, Document]], done: Iterator[dict]) -> Iterator[tuple[int, Document, dict | None]]:
    """Each document with the row an earlier run wrote for it (rows come in index order), or None."""
    next_done = next(done, None)
    for index, doc in documents:
        while next_done is not None and next_done["index"] < index:
            next_done = next(done, None)
        row = next_done if next_done is not None and next_done["index"] == index else None
        if row is not None and row["id"] != doc.id:
            raise PplError(
                f"the data changed since the run in this output directory began: document {index} has id"
                f" {doc.id!r}, but {row['id']!r} in documents.jsonl; use --overwrite to start afresh",
                EXIT_DATA,
            )
        yield index, doc, row


def tokenize_batch(
    pending: list[tuple[int, Document, dict | None]], encode, windowing: Windowing, conditional: Conditional | None = None
) -> list[Tokenized]:
    if conditional is not None:
        return conditional_batch(pending, encode, conditional)
    todo = [doc.text for _, doc, row in pending if row is None and doc.text.strip()]
    encoded = iter(token_ids(encode, todo, windowing))
    out = []
    for index, doc, row in pending:
        if row is not None:
            out.append(Tokenized(index, doc, None, done_length(row), row))
        elif not doc.text.strip():
            out.append(Tokenized(index, doc, None, 0))
        else:
            ids = next(encoded)
            scored = has_tokens_to_score(len(ids), windowing)
            out.append(Tokenized(index, doc, ids if scored else None, len(ids) if scored else 0))
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


def joined_document(documents: Iterable[tuple[int, Document]], encode, windowing: Windowing, done: Iterator[dict]) -> Iterator[list[Tokenized]]:
    """hf-recipe and llama-cpp score the corpus as one sequence, the documents joined: that text and
    its token ids are held in memory whole, as those tools do."""
    texts = [doc.text for _, doc in documents]
    if not texts:
        return
    doc = Document(JOINED_ID, JOIN.join(texts))
    row = next(done, None)
    if row is not None and row["index"] == 0:
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
