"""A record's fields -> a Document: the types that flow through the data stage, and how errors name a record."""

from __future__ import annotations

from typing import Any, NamedTuple

from ..config import Config
from ..errors import EXIT_DATA, PplError
from .sources import Source

LINE_FORMATS = ("jsonl", "csv", "text", "wikitext")  # records are found by line; the others by row or record number


class Document(NamedTuple):
    id: str | None
    text: str


class Record(NamedTuple):
    """One record of a source, not yet parsed: a JSON line's bytes, a table row, or a document."""

    source: Source
    position: int | None  # line (1-based) of line formats, row (0-based) of tables; None: the whole file
    payload: Any



def where(record: Record) -> str:
    """How an error names a record: `corpus.jsonl.gz line 12`, `d.parquet row 5`."""
    source, position = record.source, record.position
    if position is None:
        return source.name
    if source.format in LINE_FORMATS:
        return f"{source.name} line {position}"
    return f"{source.name} {'record' if source.format == 'json' else 'row'} {position}"


def default_id(record: Record) -> str:
    """An id that finds the record again: `file:N` is line N (1-based) of a line format,
    `file[N]` record N (0-based) of a Parquet file, JSON array or hub split."""
    source, position = record.source, record.position
    if position is None:
        return source.name
    if source.format in LINE_FORMATS:
        return f"{source.name}:{position}"
    return f"{source.name}[{position}]"


def record_document(row: dict, where: str, default: str, config: Config) -> Document:
    """Take the text (and id) fields of a record, with errors that name the record."""
    if config.text_field not in row:
        fields = ", ".join(map(str, row)) or "none"
        raise PplError(f"{where} has no field {config.text_field!r} (fields: {fields}); use --text-field", EXIT_DATA)
    text = row[config.text_field]
    if not isinstance(text, str):
        raise PplError(f"{where}: field {config.text_field!r} is {type(text).__name__}, not a string", EXIT_DATA)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # JSON can spell a lone surrogate (\\ud800), which is not Unicode text
            raise PplError(f"{where}: field {config.text_field!r} holds a lone surrogate, not valid Unicode", EXIT_DATA) from None
    doc_id = default
    if config.id_field is not None:
        if config.id_field not in row:
            fields = ", ".join(map(str, row))
            raise PplError(f"{where} has no id field {config.id_field!r} (fields: {fields})", EXIT_DATA)
        doc_id = str(row[config.id_field])
    return Document(doc_id, text)
