"""Each kind of source read as a stream of records: JSON Lines, JSON, CSV, Parquet, text, WikiText, hub datasets, the built-in corpus.

A record is not parsed here (a JSON line stays bytes, a Parquet row stays in its batch), so the
records of other shards cost only the reading. Plain text, WikiText articles and the built-in
corpus are documents already.
"""

from __future__ import annotations

import ast
import csv
import importlib.util
import io
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import BinaryIO

from ..config import Config
from ..errors import EXIT_DATA, PplError, first_line
from .records import DEFAULT_ID_FIELD, MISSING, Document, Record, field_value, top_level_fields
from .sources import WIKITEXT_HUB, ByteCounter, Source, open_binary, open_seekable

# Standard-library modules whose docstrings are long English prose, in a fixed order. They are
# read from the installed sources (never imported); the text varies a little between Python
# versions, which the data fingerprint in summary.json records.
DOCSTRING_MODULES = (
    "configparser",
    "socketserver",
    "statistics",
    "turtle",
    "wave",
    "fileinput",
    "_threading_local",
    "argparse",
)
WIKITEXT_HEADING = re.compile(r"^ = [^=].* = $")  # " = Title = ", not " = = Section = = "
PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")  # --doc-split blank-line
BOM = b"\xef\xbb\xbf"
PARQUET_BATCH = 1024  # rows per Arrow batch


def all_records(sources: list[Source], config: Config, counter: ByteCounter, stdin, all_columns: bool = False, texts=None) -> Iterator[Record]:
    """`stdin`: the stream --data - reads; `texts`: the records of texts given from Python (each a dict)."""
    for source in sources:
        if source.kind == "builtin":
            yield from (Record(source, None, doc) for doc in python_docstrings())
        elif source.kind == "texts":
            if texts is None:
                raise PplError(f"--data {source.spec}: texts are given from Python (ppl_cli.score), not by name", EXIT_DATA)
            yield from (Record(source, i, row) for i, row in enumerate(texts))
        elif source.kind == "hub":
            yield from hub_records(source, config)
        elif source.format == "parquet":
            yield from parquet_records(source, config, counter, all_columns)
        else:
            stream, source = open_binary(source, counter, stdin)
            with stream:
                yield from stream_records(source, stream, config)


def stream_records(source: Source, stream: BinaryIO, config: Config) -> Iterator[Record]:
    fmt = source.format
    if fmt == "":  # standard input: JSON Lines if its first non-blank line is a record, else text
        head = []
        for number, line in read_lines(stream, source):
            head.append((number, line))
            if line.strip():
                break
        records = head and is_record_line(head[-1][1], config.messages_field or config.words_field or config.text_field)
        source = replace(source, format="jsonl" if records else "text")
        lines = itertools.chain(head, read_lines(stream, source, start=len(head) + 1))
        if records:
            yield from jsonl_records(source, lines)
        else:
            yield from text_records(source, stream, config, lines, prefix=b"".join(line for _, line in head))
    elif fmt == "jsonl":
        yield from jsonl_records(source, read_lines(stream, source))
    elif fmt == "text":
        yield from text_records(source, stream, config, read_lines(stream, source))
    elif fmt == "wikitext":
        lines = decoded_lines(read_lines(stream, source), source, config)
        yield from (Record(source, number, doc) for number, doc in wikitext_articles(lines))
    elif fmt == "json":
        yield from json_records(source, stream, config)
    elif fmt == "csv":
        yield from csv_records(source, stream, config)


def read_lines(stream: BinaryIO, source: Source, start: int = 1) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes with "\\n") of a binary stream; a read failure names the file and line."""
    number = start - 1
    try:
        for number, line in enumerate(stream, start=start):
            yield number, line
    except PplError:
        raise
    except Exception as e:  # truncated or corrupt compression, I/O: one line naming where
        raise PplError(f"{source.name} is truncated or corrupt after line {number}: {first_line(e)}", EXIT_DATA) from None


def read_all(stream: BinaryIO, source: Source) -> bytes:
    try:
        return stream.read()
    except Exception as e:
        raise PplError(f"{source.name} is truncated or corrupt: {first_line(e)}", EXIT_DATA) from None


def decode(raw: bytes, name: str, config: Config, line: int | None = None, offset: int = 0) -> str:
    try:
        return raw.decode("utf-8", errors=config.encoding_errors)
    except UnicodeDecodeError as e:
        where = f"{name} line {line}" if line is not None else name
        raise PplError(
            f"{where} is not valid UTF-8 at byte offset {offset + e.start}; use --encoding-errors replace to read it anyway",
            EXIT_DATA,
        ) from None


def decoded_lines(lines: Iterable[tuple[int, bytes]], source: Source, config: Config) -> Iterator[tuple[int, str]]:
    """Lines as text, split further where Python's str.splitlines would (\\r, \\u2028, ...), so that
    documents are exactly what splitting the whole decoded text gives."""
    offset = 0
    for number, raw in lines:
        text = decode(raw, source.name, config, number, offset)
        offset += len(raw)
        for part in text.splitlines(keepends=True):
            yield number, part


# JSON Lines


def jsonl_records(source: Source, lines: Iterable[tuple[int, bytes]]) -> Iterator[Record]:
    """Non-blank lines, unparsed: a line of another shard is never decoded."""
    for number, line in lines:
        if line.strip():
            yield Record(source, number, line)


def is_record_line(line: bytes, main_field: str) -> bool:
    if not line.lstrip().startswith((b"{", BOM + b"{")):
        return False
    try:
        row = json.loads(line.removeprefix(BOM))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(row, dict) and field_value(row, main_field) is not MISSING


# JSON, CSV, Parquet


def json_records(source: Source, stream: BinaryIO, config: Config) -> Iterator[Record]:
    """A JSON array of objects, an object holding one such array, or JSON Lines named .json.

    A JSON document is one value, so the file is parsed whole; large corpora belong in JSON Lines.
    """
    raw = read_all(stream, source)
    try:
        data = json.loads(decode(raw, source.name, config).removeprefix("\ufeff"))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON Lines
            lines = enumerate(io.BytesIO(raw), start=1)
            yield from jsonl_records(replace(source, format="jsonl"), lines)
            return
        raise PplError(f"{source.name} is not JSON: {e.msg} at line {e.lineno}", EXIT_DATA) from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise PplError(f"{source.name} must hold a list of records (or one key holding it)", EXIT_DATA)
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise PplError(f"{source.name} must hold a list of JSON objects", EXIT_DATA)
    yield from (Record(source, i, row) for i, row in enumerate(data))


def csv_records(source: Source, stream: BinaryIO, config: Config) -> Iterator[Record]:
    """Rows of a CSV file with a header; position is the line where the row starts."""
    csv.field_size_limit(2**31 - 1)  # the default, 131,072 characters, is shorter than many documents
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors=config.encoding_errors, newline="")
    reader = csv.DictReader(text)
    line = 1
    while True:
        try:
            row = next(reader, None)
        except csv.Error as e:
            raise PplError(f"{source.name} line {reader.line_num} is not valid CSV: {first_line(e)}", EXIT_DATA) from None
        except UnicodeDecodeError:
            raise PplError(
                f"{source.name} is not valid UTF-8 near line {reader.line_num + 1}; use --encoding-errors replace to read it anyway",
                EXIT_DATA,
            ) from None
        except Exception as e:
            raise PplError(f"{source.name} is truncated or corrupt after line {reader.line_num}: {first_line(e)}", EXIT_DATA) from None
        if row is None:
            return
        yield Record(source, line + 1, row)
        line = reader.line_num


def parquet_records(source: Source, config: Config, counter: ByteCounter, all_columns: bool = False) -> Iterator[Record]:
    """Rows of a Parquet file, a batch at a time (only the text and id columns unless all_columns);
    a row becomes Python values only when it is parsed."""
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(open_seekable(source, counter))
        names = file.schema_arrow.names
    except PplError:
        raise
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise PplError(f"cannot read parquet file {source.name}: {first_line(e)}", EXIT_DATA) from None
    main = (config.messages_field or config.words_field or config.text_field).split(".")[0]
    wanted = [f for f in top_level_fields(config) if f != DEFAULT_ID_FIELD or config.id_field or f in names]  # the default id where there is one
    for field in wanted:
        if field not in names:
            kind = "id field" if field == config.id_field else "field"
            hint = ("; use --messages-field" if config.messages_field else "; use --text-field") if field == main else ""
            raise PplError(f"{source.name} has no {kind} {field!r} (fields: {', '.join(names)}){hint}", EXIT_DATA)
    columns = None if all_columns else wanted
    rows = file.metadata.num_rows
    row = 0
    try:
        for batch in file.iter_batches(batch_size=PARQUET_BATCH, columns=columns):
            for i in range(batch.num_rows):
                yield Record(source, row, (batch, i))
                row += 1
            if not source.compression and rows:
                counter.bytes += source.size * batch.num_rows // rows
    except PplError:
        raise
    except Exception as e:
        raise PplError(f"cannot read parquet file {source.name} after row {row}: {first_line(e)}", EXIT_DATA) from None
    finally:
        file.close()


def table_row(record: Record) -> dict:
    """A record's fields: a Parquet row made Python values; the others are dicts already."""
    if record.source.format == "parquet":
        batch, i = record.payload
        return {name: column[i].as_py() for name, column in zip(batch.schema.names, batch.columns)}
    return record.payload


# Plain text and WikiText


def text_records(source: Source, stream: BinaryIO, config: Config, lines, prefix: bytes = b"") -> Iterator[Record]:
    """One document per file, per line, or per paragraph (--doc-split)."""
    if config.doc_split == "file":
        raw = prefix + read_all(stream, source)
        if raw:  # zero bytes hold no document
            yield Record(source, None, decode(raw, source.name, config))
        return
    text_lines = decoded_lines(lines, source, config)
    if config.doc_split == "line":
        lines_without_ends = ((number, (line.splitlines() or [""])[0]) for number, line in text_lines)
        yield from (Record(source, number, line) for number, line in lines_without_ends if line.strip())
    else:
        yield from (Record(source, number, part) for number, part in paragraphs(text_lines) if part.strip())


def paragraphs(lines: Iterable[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """(first line, paragraph) exactly as re.split(PARAGRAPH_BREAK, whole text) gives them, holding
    one paragraph at a time: the text is cut before a non-blank line that follows a break, where no
    break can span the cut."""
    buffer: list[str] = []
    first = previous = None
    previous_blank = False
    for number, line in lines:
        blank = line.endswith("\n") and not line[:-1].strip(" \t\r\f\v")
        if not blank and previous_blank and previous is not None and previous > 1 and buffer:
            yield from split_paragraphs("".join(buffer), first)
            buffer, first = [], None
        if first is None:
            first = number
        buffer.append(line)
        previous, previous_blank = number, blank
    if buffer:
        yield from split_paragraphs("".join(buffer), first)


def split_paragraphs(text: str, first_line_number: int) -> Iterator[tuple[int, str]]:
    start = 0
    for match in itertools.chain(PARAGRAPH_BREAK.finditer(text), [None]):
        end = match.start() if match else len(text)
        yield first_line_number + text.count("\n", 0, start), text[start:end]
        if match:
            start = match.end()


def wikitext_articles(lines: Iterable[tuple[int, str]]) -> Iterator[tuple[int, Document]]:
    """(heading line, article) at the ` = Title = ` headings, one article in memory at a time.

    Lines before the first heading form a document of their own only if they hold any text.
    """
    title, body, start = None, [], 1
    for number, line in lines:
        if WIKITEXT_HEADING.match(line.rstrip("\n")):
            if title is not None or "".join(body).strip():
                yield start, Document(title, "".join(body))
            title, body, start = line.strip().strip("=").strip(), [], number
        body.append(line)
    if title is not None or "".join(body).strip():
        yield start, Document(title, "".join(body))


def python_docstrings() -> list[Document]:
    docs = []
    for name in DOCSTRING_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue  # a stripped-down Python without this module's source
        with open(spec.origin, encoding="utf-8") as f:
            docstring = ast.get_docstring(ast.parse(f.read()))
        if docstring:
            docs.append(Document(name, docstring))
    if not docs:
        raise PplError("the built-in corpus needs the Python standard library's sources", EXIT_DATA)
    return docs


# Hugging Face hub


def hub_records(source: Source, config: Config) -> Iterator[Record]:
    """Rows of one split of a hub dataset: from the cache (downloaded once), or with --streaming as
    they arrive, without downloading the dataset whole."""
    if source.format == "wikitext":
        dataset_id, default_config, default_split = WIKITEXT_HUB
        rows = load_hub_split(dataset_id, config.data_config or default_config, config.split or default_split, config.streaming)
        lines = ((i, row.get("text", "")) for i, row in enumerate(hub_rows(rows, dataset_id)))
        yield from (Record(source, number, doc) for number, doc in wikitext_articles(lines))
        return
    rows = load_hub_split(source.name, config.data_config, config.split, config.streaming)
    split = config.split or getattr(rows, "split", None) or "rows"
    source = replace(source, name=f"{source.name}:{split}")
    yield from (Record(source, i, row) for i, row in enumerate(hub_rows(rows, source.spec)))


def hub_rows(rows, dataset_id: str) -> Iterator[dict]:
    number = 0
    try:
        for number, row in enumerate(rows):
            yield row
    except PplError:
        raise
    except Exception as e:  # a connection lost mid-stream, a bad shard file
        raise PplError(f"reading dataset {dataset_id} failed after row {number}: {first_line(e)}", EXIT_DATA) from None


def load_hub_split(dataset_id: str, name: str | None, split: str | None, streaming: bool = False):
    """One split of a hub dataset (an IterableDataset with streaming); without --split, the only one."""
    import datasets

    try:
        loaded = datasets.load_dataset(dataset_id, name, split=split, streaming=streaming)
    except Exception as e:  # datasets raises many types (connection, missing config, missing split)
        message = first_line(e)
        hint = "" if "offline" in message.lower() else " (offline? cached datasets load with HF_DATASETS_OFFLINE=1)"
        raise PplError(f"cannot load dataset {dataset_id}: {message}{hint}", EXIT_DATA) from None
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if len(loaded) != 1:
            raise PplError(f"dataset {dataset_id} has splits {', '.join(loaded)}; choose one with --split", EXIT_DATA)
        loaded = next(iter(loaded.values()))
    return loaded
