"""A record's fields -> a Document: the types that flow through the data stage, and how errors name a record.

A document is a text, or a text given a context (--context-field, --context-template), or a
conversation (--messages-field); the engine decides which of its tokens are scored.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, NamedTuple

from ..config import Config
from ..errors import EXIT_DATA, PplError
from .sources import Source

LINE_FORMATS = ("jsonl", "csv", "text", "wikitext")  # records are found by line; the others by row or record number
MISSING_GROUP = "(missing)"  # --group-by: the group of a record without the field
DEFAULT_ID_FIELD = "id"  # without --id-field: a record's field of this name is its id, where it has one
SOURCE_KEYS = ("file", "dir")  # --group-by keys that name the record's source file or its folder, not a field
TEMPLATE_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\\\": "\\"}  # --context-template '{q}\n' as a shell passes it


@dataclass(frozen=True, slots=True)
class Document:
    """One document: `text` is what is scored (a plain document, or a continuation given `context`);
    a conversation keeps its `messages` (each a dict with at least a role and a string content)."""

    id: str | None
    text: str
    context: str | None = None
    messages: tuple[dict, ...] | None = None
    group: str | None = None  # --group-by: the domain it is reported in
    where: str = field(default="", compare=False)  # how errors name its record: "chats.jsonl line 12"
    words: tuple[str, ...] | None = None  # --words-field: the corpus's own words, `text` being them joined by spaces

    @property
    def empty(self) -> bool:
        """Nothing that could be scored: no message content, or a text of whitespace only."""
        if self.messages is not None:
            return not any(m["content"].strip() for m in self.messages)
        return not self.text.strip()


@dataclass
class BadRecords:
    """--skip-bad-records: the records that could not be read as documents, counted; the first
    FIRST named, with their error (as summary.json's bad_records holds them)."""

    FIRST = 10
    count: int = 0
    first: list = field(default_factory=list)

    def add(self, where: str, error: str) -> None:
        self.count += 1
        if len(self.first) < self.FIRST:
            self.first.append({"record": where, "error": error})

    def describe(self) -> dict:
        return {"count": self.count, "first": list(self.first)}

    @classmethod
    def joined(cls, parts: list[dict]) -> dict:
        """The bad records of several processes or runs, as one description."""
        out = cls()
        for part in parts:
            out.count += part["count"]
            out.first += part["first"][: cls.FIRST - len(out.first)]
        return out.describe()


class Record(NamedTuple):
    """One record of a source, not yet parsed: a JSON line's bytes, a table row, or a document."""

    source: Source
    position: int | None  # line (1-based) of line formats, row (0-based) of tables; None: the whole file
    payload: Any


def where(record: Record) -> str:
    """How an error names a record: `corpus.jsonl.gz line 12`, `d.parquet row 5`, `text 3`."""
    source, position = record.source, record.position
    if position is None:
        return source.name
    if source.format in LINE_FORMATS:
        return f"{source.name} line {position}"
    if source.format == "texts":
        return f"text {position}"
    return f"{source.name} {'record' if source.format == 'json' else 'row'} {position}"


def default_id(record: Record) -> str:
    """An id that finds the record again: `file:N` is line N (1-based) of a line format,
    `file[N]` record N (0-based) of a Parquet file, JSON array or hub split, `N` text N (0-based)
    of a list given from Python."""
    source, position = record.source, record.position
    if position is None:
        return source.name
    if source.format in LINE_FORMATS:
        return f"{source.name}:{position}"
    if source.format == "texts":
        return str(position)
    return f"{source.name}[{position}]"


MISSING = object()


def field_value(row: dict, path: str) -> Any:
    """A field of a record: the key itself, else a dotted path into nested objects (`meta.lang`); MISSING if absent."""
    if path in row:
        return row[path]
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


def top_level_fields(config: Config) -> list[str]:
    """The columns a record needs for its document (what a Parquet reader reads)."""
    group_field = config.group_by if config.group_by not in (None, *SOURCE_KEYS) else None
    paths = [config.messages_field or config.words_field or config.text_field, config.id_field or DEFAULT_ID_FIELD, config.context_field, group_field]
    if config.context_template:
        paths += template_fields(config.context_template)
    return list(dict.fromkeys(p.split(".")[0] for p in paths if p))


def template_fields(template: str) -> list[str]:
    """The {field} placeholders of a --context-template, in order."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(unescape(template)) if name]
    except ValueError as e:
        raise PplError(f"--context-template is not a valid template: {e}") from None


def unescape(template: str) -> str:
    return re.sub(r"\\\\|\\n|\\t", lambda m: TEMPLATE_ESCAPES[m.group(0)], template)


def group_of(row: dict | None, source: Source, where: str, config: Config) -> str | None:
    """--group-by: the source file's name (`file`), its folder (`dir`), or a field's value (a dotted
    path; a record without it, or null, is in MISSING_GROUP; a list or object is an error)."""
    key = config.group_by
    if key is None:
        return None
    if key == "file":
        return source.name
    if key == "dir":
        return str(PurePosixPath(source.name).parent)
    value = field_value(row, key) if row is not None else MISSING
    if value is MISSING or value is None:
        return MISSING_GROUP
    if isinstance(value, (list, dict)):
        kind = "list" if isinstance(value, list) else "object"
        raise PplError(f"{where}: the --group-by field {key!r} is a {kind}, not one value", EXIT_DATA)
    return value if isinstance(value, str) else json.dumps(value)


def record_document(row: dict, where: str, default: str, config: Config, source: Source) -> Document:
    """Take the text (or messages), context, id and group fields of a record, with errors that name the record."""
    words = None
    if config.messages_field:
        text, context, messages = "", None, conversation(row, where, config.messages_field)
    elif config.words_field:
        words, context, messages = word_list(row, where, config.words_field), None, None
        text = " ".join(words)
    else:
        text, messages = text_field(row, config.text_field, where, "; use --text-field"), None
        context = None
        if config.context_field:
            context = text_field(row, config.context_field, where, "; use --context-field")
        elif config.context_template:
            context = filled(config.context_template, row, where)
    doc_id = default
    if config.id_field is not None:
        value = field_value(row, config.id_field)
        if value is MISSING:
            raise PplError(f"{where} has no id field {config.id_field!r} (fields: {fields_of(row)})", EXIT_DATA)
        doc_id = str(value)
    elif isinstance(row.get(DEFAULT_ID_FIELD), (str, int)) and not isinstance(row[DEFAULT_ID_FIELD], bool):
        doc_id = str(row[DEFAULT_ID_FIELD])  # a field named id, where a record has one (a string or an integer)
    return Document(doc_id, text, context, messages, group_of(row, source, where, config), where, words)


def word_list(row: dict, where: str, name: str) -> tuple[str, ...]:
    """--words-field: a list of words, each a string with something besides whitespace."""
    words = field_value(row, name)
    if words is MISSING:
        raise PplError(f"{where} has no field {name!r} (fields: {fields_of(row)}); use --words-field", EXIT_DATA)
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise PplError(f"{where}: field {name!r} is {type(words).__name__}, not a list of words (strings)", EXIT_DATA)
    for k, word in enumerate(words):
        if not word.strip():
            raise PplError(f"{where}: word {k} of {name!r} is {'empty' if not word else 'whitespace only'}", EXIT_DATA)
        check_unicode(word, where, f"word {k}")
    return tuple(words)


def text_field(row: dict, name: str, where: str, hint: str = "") -> str:
    text = field_value(row, name)
    if text is MISSING:
        raise PplError(f"{where} has no field {name!r} (fields: {fields_of(row)}){hint}", EXIT_DATA)
    if not isinstance(text, str):
        raise PplError(f"{where}: field {name!r} is {type(text).__name__}, not a string", EXIT_DATA)
    check_unicode(text, where, f"field {name!r}")
    return text


def check_unicode(text: str, where: str, what: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # JSON can spell a lone surrogate (\\ud800), which is not Unicode text
            raise PplError(f"{where}: {what} holds a lone surrogate, not valid Unicode", EXIT_DATA) from None


def filled(template: str, row: dict, where: str) -> str:
    """--context-template with each {field} (a dotted path) replaced by the record's value; null reads as ''."""
    values = {}
    for name in template_fields(template):
        value = field_value(row, name)
        if value is MISSING:
            raise PplError(f"{where} has no field {name!r} for --context-template (fields: {fields_of(row)})", EXIT_DATA)
        values[name] = "" if value is None else value if isinstance(value, str) else str(value)
    text = "".join(literal + (values[name] if name else "") for literal, name, _, _ in string.Formatter().parse(unescape(template)))
    check_unicode(text, where, "the context")
    return text


def conversation(row: dict, where: str, name: str) -> tuple[dict, ...]:
    """--messages-field: a list of {"role", "content"} messages (other keys are kept for the chat template)."""
    messages = field_value(row, name)
    if messages is MISSING:
        raise PplError(f"{where} has no field {name!r} (fields: {fields_of(row)}); use --messages-field", EXIT_DATA)
    if not isinstance(messages, list):
        raise PplError(f"{where}: field {name!r} is {type(messages).__name__}, not a list of messages", EXIT_DATA)
    for k, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise PplError(f"{where}: message {k} of {name!r} is not an object with a \"role\" and a \"content\"", EXIT_DATA)
        if not isinstance(message["content"], str):
            kind = type(message["content"]).__name__
            raise PplError(f"{where}: message {k} of {name!r} has a {kind} content; only text content can be scored", EXIT_DATA)
        check_unicode(message["content"], where, f"message {k}")
    return tuple(messages)


def fields_of(row: dict) -> str:
    return ", ".join(map(str, row)) or "none"
