"""Documents from a data source: the built-in corpus, hub datasets, local files or stdin.

Every loader returns a list of Document(id, text) in a fixed order, with text as given (word and
byte counts are taken from it). Empty documents are kept here and skipped by the pipeline, so that
a document's index is always its position in the source.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import importlib.util
import io
import json
import re
import sys
from pathlib import Path
from typing import NamedTuple

from .config import Config
from .errors import EXIT_DATA, PplError


class Document(NamedTuple):
    id: str | None
    text: str


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
WIKITEXT_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
WIKITEXT_HEADING = re.compile(r"^ = [^=].* = $")  # " = Title = ", not " = = Section = = "
TEXT_SUFFIXES = {".txt", ".md", ".text"}
WIKITEXT_SUFFIXES = {".tokens", ".raw"}
TABLE_SUFFIXES = {".jsonl", ".json", ".csv", ".parquet"}


def load_documents(config: Config, stdin: io.BufferedIOBase | None = None) -> tuple[list[Document], dict]:
    """The documents of config.data (at most config.limit) and a description of the source."""
    source = config.data
    check_option_conflicts(config)
    if source == "python-docstrings":
        docs, info = python_docstrings(), {"kind": "python-docstrings", "python": sys.version.split()[0]}
    elif source == "-":
        stream = stdin if stdin is not None else sys.stdin.buffer
        docs, info = parse_stdin(stream.read(), config), {"kind": "stdin"}
    elif source == "wikitext":
        docs, info = wikitext_from_hub(config), {"kind": "hub", "dataset": WIKITEXT_HUB[0]}
    elif Path(source).exists():
        docs, info = load_path(Path(source), config), {"kind": "path", "path": str(Path(source).resolve())}
    elif looks_like_path(source):
        raise PplError(f"data not found: {source}", EXIT_DATA)
    else:
        docs, info = hub_dataset(source, config), {"kind": "hub", "dataset": source}
    if config.limit is not None:
        docs = docs[: config.limit]
    if not docs:
        raise PplError(f"no documents in {source}", EXIT_DATA)
    info.update(source=source, documents=len(docs), fingerprint=fingerprint(docs))
    return docs, info


def check_option_conflicts(config: Config) -> None:
    """Options that mean nothing for this kind of source are an error, not silently ignored."""
    source = config.data
    local = source in ("-", "python-docstrings") or Path(source).exists() or looks_like_path(source)
    if local and (config.data_config or config.split):
        option = "--data-config" if config.data_config else "--split"
        raise PplError(f"{option} applies to hub datasets, not to {source}")
    suffix = Path(source).suffix.lower()
    records = not local or source == "wikitext" or suffix in TABLE_SUFFIXES | WIKITEXT_SUFFIXES
    if records and config.doc_split != "file":
        raise PplError(f"--doc-split applies to plain text (.txt, directories, stdin), not to {source}")


def looks_like_path(source: str) -> bool:
    suffix = Path(source).suffix.lower()
    known = TEXT_SUFFIXES | WIKITEXT_SUFFIXES | TABLE_SUFFIXES
    return source.startswith((".", "/", "~")) or "\\" in source or suffix in known or source.count("/") > 1


def fingerprint(docs: list[Document]) -> str:
    """sha256 over every document's id and text, so two runs on the same data can be matched."""
    h = hashlib.sha256()
    for doc in docs:
        h.update(json.dumps([doc.id, doc.text], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


# --- built-in corpus -------------------------------------------------------------------------


def python_docstrings() -> list[Document]:
    docs = []
    for name in DOCSTRING_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue  # a stripped-down Python without this module's source
        docstring = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8")))
        if docstring:
            docs.append(Document(name, docstring))
    if not docs:
        raise PplError("the built-in corpus needs the Python standard library's sources", EXIT_DATA)
    return docs


# --- local files -----------------------------------------------------------------------------


def load_path(path: Path, config: Config) -> list[Document]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise PplError(f"no .txt files in directory {path}", EXIT_DATA)
        docs = []
        for file in files:
            name = file.relative_to(path).as_posix()
            docs += split_text(read_text(file, config), config.doc_split, name)
        return docs
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return split_text(read_text(path, config), config.doc_split, path.name)
    if suffix in WIKITEXT_SUFFIXES:
        return wikitext_articles(read_text(path, config).splitlines(keepends=True))
    if suffix == ".jsonl":
        return jsonl_records(read_text(path, config), config, path.name)
    if suffix == ".json":
        return json_records(read_text(path, config), config, path.name)
    if suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(read_text(path, config), newline="")))
        return records_to_documents(rows, config, path.name)
    if suffix == ".parquet":
        return parquet_records(path, config)
    known = ", ".join(sorted(TEXT_SUFFIXES | WIKITEXT_SUFFIXES | TABLE_SUFFIXES))
    raise PplError(f"unknown file type {suffix or '(none)'} for {path}; known: {known}, or a directory", EXIT_DATA)


def read_text(path: Path, config: Config) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise PplError(f"cannot read {path}: {e.strerror}", EXIT_DATA) from None
    return decode(raw, str(path), config)


def decode(raw: bytes, name: str, config: Config) -> str:
    try:
        return raw.decode("utf-8", errors=config.encoding_errors)
    except UnicodeDecodeError as e:
        raise PplError(
            f"{name} is not valid UTF-8 at byte offset {e.start}; use --encoding-errors replace to read it anyway",
            EXIT_DATA,
        ) from None


def split_text(text: str, doc_split: str, name: str) -> list[Document]:
    """One document per file, per line, or per blank-line-separated paragraph."""
    if doc_split == "file":
        return [Document(name, text)]
    if doc_split == "line":
        parts = text.splitlines()
    else:
        parts = re.split(r"\n(?:[ \t\r\f\v]*\n)+", text)
    return [Document(f"{name}:{i}", part) for i, part in enumerate(p for p in parts if p.strip())]


def wikitext_articles(lines: list[str]) -> list[Document]:
    """Group WikiText lines into one document per article, at the ` = Title = ` headings.

    Lines before the first heading form a document of their own only if they hold any text.
    """
    docs, title, body = [], None, []
    for line in lines:
        heading = WIKITEXT_HEADING.match(line.rstrip("\n"))
        if heading:
            if title is not None or "".join(body).strip():
                docs.append(Document(title, "".join(body)))
            title, body = line.strip().strip("=").strip(), []
        body.append(line)
    if title is not None or "".join(body).strip():
        docs.append(Document(title, "".join(body)))
    return docs


def jsonl_records(text: str, config: Config, name: str) -> list[Document]:
    rows, labels = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PplError(f"{name} line {number} is not JSON: {e.msg}", EXIT_DATA) from None
        if not isinstance(row, dict):
            raise PplError(f"{name} line {number} is not a JSON object", EXIT_DATA)
        rows.append(row)
        labels.append(f"line {number}")
    return records_to_documents(rows, config, name, labels)


def json_records(text: str, config: Config, name: str) -> list[Document]:
    """A JSON array of objects, an object holding one such array, or JSON Lines named .json."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: JSON Lines
            return jsonl_records(text, config, name)
        raise PplError(f"{name} is not JSON: {e.msg} at line {e.lineno}", EXIT_DATA) from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise PplError(f"{name} must hold a list of records (or one key holding it)", EXIT_DATA)
        data = lists[0]
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise PplError(f"{name} must hold a list of JSON objects", EXIT_DATA)
    return records_to_documents(data, config, name)


def parquet_records(path: Path, config: Config) -> list[Document]:
    import pyarrow.parquet as pq  # a dependency of `datasets`

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise PplError(f"cannot read parquet file {path}: {str(e).splitlines()[0]}", EXIT_DATA) from None
    return records_to_documents(table.to_pylist(), config, path.name)


def records_to_documents(rows: list[dict], config: Config, name: str, labels: list[str] | None = None) -> list[Document]:
    """Take the text (and id) fields of each record, with errors that name the record."""
    docs = []
    for number, row in enumerate(rows):
        where = f"{name} {labels[number] if labels else f'record {number}'}"
        if config.text_field not in row:
            fields = ", ".join(map(str, row)) or "none"
            raise PplError(
                f"{where} has no field {config.text_field!r} (fields: {fields}); use --text-field",
                EXIT_DATA,
            )
        text = row[config.text_field]
        if not isinstance(text, str):
            raise PplError(
                f"{where}: field {config.text_field!r} is {type(text).__name__}, not a string",
                EXIT_DATA,
            )
        doc_id = None
        if config.id_field is not None:
            if config.id_field not in row:
                fields = ", ".join(map(str, row))
                raise PplError(f"{where} has no id field {config.id_field!r} (fields: {fields})", EXIT_DATA)
            doc_id = str(row[config.id_field])
        docs.append(Document(doc_id, text))
    return docs


def parse_stdin(raw: bytes, config: Config) -> list[Document]:
    """JSON Lines when every non-blank line is an object with the text field, else plain text."""
    text = decode(raw, "standard input", config)
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and all(is_record_line(line, config.text_field) for line in lines):
        return jsonl_records(text, config, "standard input")
    return split_text(text, config.doc_split, "stdin")


def is_record_line(line: str, text_field: str) -> bool:
    if not line.lstrip().startswith("{"):
        return False
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(row, dict) and text_field in row


# --- Hugging Face hub ------------------------------------------------------------------------


def wikitext_from_hub(config: Config) -> list[Document]:
    """WikiText-2 (raw) test split from the hub, one document per article."""
    dataset_id, default_config, default_split = WIKITEXT_HUB
    rows = load_hub_split(dataset_id, config.data_config or default_config, config.split or default_split)
    if "text" not in rows.column_names:
        raise PplError(f"{dataset_id} has no 'text' column (columns: {', '.join(rows.column_names)})", EXIT_DATA)
    return wikitext_articles(rows["text"])


def hub_dataset(dataset_id: str, config: Config) -> list[Document]:
    rows = load_hub_split(dataset_id, config.data_config, config.split)
    return records_to_documents(list(rows), config, dataset_id)


def load_hub_split(dataset_id: str, name: str | None, split: str | None):
    """One split of a hub dataset; without --split, the only split there is."""
    import datasets

    try:
        loaded = datasets.load_dataset(dataset_id, name, split=split)
    except Exception as e:  # datasets raises many types (connection, missing config, missing split)
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = "" if "offline" in message.lower() else " (offline? cached datasets load with HF_DATASETS_OFFLINE=1)"
        raise PplError(f"cannot load dataset {dataset_id}: {message}{hint}", EXIT_DATA) from None
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            raise PplError(f"dataset {dataset_id} has splits {', '.join(loaded)}; choose one with --split", EXIT_DATA)
        loaded = next(iter(loaded.values()))
    return loaded
