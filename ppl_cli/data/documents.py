"""Records -> documents: every source read as a stream, its documents numbered across all sources.

A document's `index` is its position in the whole input (all sources in order, empty documents
included), so it is the same in every shard and every run. Records of other shards are scanned
past (a line read, a row skipped) but never parsed. Text is kept as given: word and byte counts
are taken from it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

from ..config import Config
from ..errors import EXIT_DATA, PplError, PplWarning
from .formats import BOM, all_records, decode, table_row
from .records import MISSING_GROUP, BadRecords, Document, Record, default_id, group_of, record_document, where
from .sources import ByteCounter, Source, resolve_sources

FINGERPRINT_PREFIX = "sha256-sum:"


class DocumentStream:
    """The documents of every source, in order, with their index.

    Iterating yields (index, Document) for the indices `mine` accepts; the others are only
    counted. `count` is the number of documents read so far (all shares, at most --limit),
    `digest` the sum of the yielded documents' digests (see fingerprint()).
    """

    def __init__(
        self, sources: list[Source], config: Config, mine: Callable[[int], bool] = lambda i: True, stdin=None, all_columns: bool = False,
        texts=None,
    ):  # fmt: skip
        self.sources = sources
        self.config = config
        self.mine = mine
        self.counter = ByteCounter()
        self.count = 0
        self.digest = 0
        self.groups: set[str] = set()  # --group-by: the groups of the documents yielded so far
        self.bad = BadRecords()  # --skip-bad-records: the records passed over
        self._records = itertools.islice(all_records(sources, config, self.counter, stdin, all_columns, texts), config.limit)
        self._first: list[Record] = []

    @property
    def total_bytes(self) -> int | None:
        """Bytes of all input files as stored, when every source is a file (progress and ETA)."""
        sizes = [s.size for s in self.sources]
        return sum(sizes) if all(s.kind == "file" for s in self.sources) and None not in sizes else None

    def check(self) -> None:
        """Read and parse the first record now, before a model loads: an empty input or a wrong
        --text-field fails at once. With --skip-bad-records, the first record that can be read
        (those before it are read again, and counted, as the stream goes)."""
        names = ", ".join(s.spec for s in self.sources)
        while True:
            record = next(self._records, None)
            if record is None:
                if self._first:  # every record is bad: the first one's error says why
                    raise PplError(f"no record of {names} can be read ({len(self._first):,} tried): {self.error_of(self._first[0])}", EXIT_DATA)
                raise PplError(f"no documents in {'standard input' if names == '-' else names}", EXIT_DATA)
            self._first.append(record)
            try:
                doc = to_document(record, self.config)
                break
            except PplError as e:
                if not self.skips(e):
                    raise skippable(e) from None
        if doc.group == MISSING_GROUP:
            warnings.warn(
                f"{doc.where} has no --group-by field {self.config.group_by!r}: such records are reported as the group {MISSING_GROUP!r}",
                PplWarning,
                stacklevel=2,
            )

    def skips(self, error: PplError) -> bool:
        """Whether --skip-bad-records passes over the record that raised `error` (bad data, not a bad option)."""
        return self.config.skip_bad_records and error.exit_code == EXIT_DATA

    def error_of(self, record: Record) -> str:
        try:
            to_document(record, self.config)
        except PplError as e:
            return str(e)
        return "no error"

    def __iter__(self) -> Iterator[tuple[int, Document]]:
        for index, _, doc in self.with_records():
            yield index, doc

    def with_records(self) -> Iterator[tuple[int, Record, Document]]:
        """(index, the record as read, its document) for this process's documents."""
        records = itertools.chain(self._first, self._records)
        self._first = []
        for index, record in enumerate(records):
            self.count = index + 1
            if self.mine(index):
                try:
                    doc = to_document(record, self.config)
                except PplError as e:  # a record that cannot be read: passed over (its index kept) with --skip-bad-records
                    if not self.skips(e):
                        raise skippable(e) from None
                    self.bad.add(where(record), str(e))
                    continue
                self.digest = (self.digest + digest(index, doc)) % 2**256
                if doc.group is not None and doc.group not in self.groups:
                    self.groups.add(doc.group)
                    if len(self.groups) > self.config.max_groups:
                        raise PplError(
                            f"{doc.where} makes {len(self.groups):,} groups for --group-by {self.config.group_by}, more than"
                            f" --max-groups {self.config.max_groups:,}; group by a coarser key or raise --max-groups",
                            EXIT_DATA,
                        )
                yield index, record, doc


def skippable(error: PplError) -> PplError:
    """A bad record's error, saying how to go on without it (an option's error as it is)."""
    if error.exit_code != EXIT_DATA:
        return error
    return PplError(f"{error} (--skip-bad-records passes over such records, counting them)", error.exit_code)


def digest(index: int, doc: Document) -> int:
    """sha256 of a document's index, id and text (then its context or messages, when it has them), as an integer."""
    h = hashlib.sha256(json.dumps([index, doc.id], ensure_ascii=False).encode("utf-8", "surrogatepass"))
    h.update(b"\n")
    h.update(doc.text.encode("utf-8", "surrogatepass"))
    if doc.context is not None or doc.messages is not None:
        h.update(b"\n" + json.dumps([doc.context, doc.messages], ensure_ascii=False, sort_keys=True).encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest(), "big")


def fingerprint(digest_sum: int) -> str:
    """The data fingerprint: the sum modulo 2^256 of every document's digest. A sum, so the
    fingerprints of the shards of a run add up to the whole run's."""
    return f"{FINGERPRINT_PREFIX}{digest_sum % 2**256:064x}"


def add_fingerprints(fingerprints: Iterable[str]) -> str:
    return fingerprint(sum(int(f.removeprefix(FINGERPRINT_PREFIX), 16) for f in fingerprints))


def load_documents(config: Config, stdin=None) -> list[Document]:
    """Every document of config.data as a list (tests and small inputs; runs stream)."""
    stream = DocumentStream(resolve_sources(config), config, stdin=stdin)
    stream.check()
    return [doc for _, doc in stream]



def jsonl_document(record: Record, config: Config) -> Document:
    line = record.payload
    if record.position == 1 and line.startswith(BOM):
        line = line[len(BOM) :]
    where = f"{record.source.name} line {record.position}"
    text = decode(line, record.source.name, config, record.position)
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        at = "" if e.msg.endswith(" at") else " at"  # json's messages: "Invalid control character at", "Expecting value"
        raise PplError(f"{where} is not JSON: {e.msg}{at} column {e.colno}", EXIT_DATA) from None
    if not isinstance(row, dict):
        raise PplError(f"{where} is not a JSON object", EXIT_DATA)
    return record_document(row, where, default_id(record), config, record.source)


def to_document(record: Record, config: Config) -> Document:
    fmt = record.source.format
    if fmt == "jsonl":
        return jsonl_document(record, config)
    if fmt in ("json", "csv", "parquet", "hub", "texts"):
        return record_document(table_row(record), where(record), default_id(record), config, record.source)
    named = where(record)
    group = group_of(None, record.source, named, config)
    if isinstance(record.payload, Document):  # WikiText articles, the built-in corpus
        return replace(record.payload, group=group, where=named)
    return Document(default_id(record), record.payload, group=group, where=named)  # plain text


def whole_record(record: Record, doc: Document) -> dict:
    """The record as it is in the source, every field in order: the parsed JSON object, the CSV,
    Parquet or hub row; a document of plain text or WikiText is {"id": ..., "text": ...}."""
    fmt = record.source.format
    if fmt == "jsonl":
        line = record.payload.removeprefix(BOM) if record.position == 1 else record.payload
        return json.loads(line)
    if fmt in ("json", "csv", "parquet", "hub", "texts"):
        return dict(table_row(record))
    return {"id": doc.id, "text": doc.text}

