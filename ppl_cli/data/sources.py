"""Finding and opening inputs: the values of --data become an ordered list of sources.

A source is one file (a local path or any fsspec URL, e.g. s3://...), standard input, the built-in
corpus or a hub dataset. Globs are expanded here and sorted, directories are listed (sorted, one
format each), and compressed files (.gz, .bz2, .xz, .zst) are decompressed on the fly as they are
read. Only names and sizes are read here; records become documents in documents.py.
"""

from __future__ import annotations

import io
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from ..config import Config
from ..errors import EXIT_DATA, PplError, first_line

COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".md": "text",
    ".text": "text",
    ".tokens": "wikitext",
    ".raw": "wikitext",
}
RECORD_FORMATS = {"jsonl", "json", "csv", "parquet", "hub", "texts"}  # one document per record: --doc-split does not apply
TEXTS_PREFIX = "python:"  # the data spec of texts given from Python (ppl_cli.score): "python:N texts, sha256 ..."
WIKITEXT_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1", "test")
GLOB_CHARACTERS = re.compile(r"[*?\[]")
# Magic numbers of the compressions, for standard input (files go by their suffix).
MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\xfd7zXZ\x00", "xz"), (b"BZh", "bz2"))


@dataclass(frozen=True)
class Source:
    kind: str  # "file", "stdin", "builtin", "hub" or "texts" (a list from Python)
    spec: str  # the --data value it came from
    name: str  # how document ids name it: a file's path relative to what --data named
    format: str  # a FORMATS value, "hub", "builtin", or for stdin "" until its first line is read
    compression: str | None = None
    url: str | None = None  # what fsspec opens
    size: int | None = None  # bytes as stored, for progress and the run identity


def resolve_sources(config: Config) -> list[Source]:
    """Every source of config.data, in the order given; errors name the --data value."""
    sources = [source for spec in config.data for source in resolve(spec, config)]
    check_option_conflicts(sources, config)
    return sources


def resolve(spec: str, config: Config) -> list[Source]:
    if spec == "python-docstrings":
        return [Source("builtin", spec, spec, "builtin")]
    if spec == "-":
        return [Source("stdin", spec, "stdin", "")]
    if spec.startswith(TEXTS_PREFIX):
        return [Source("texts", spec, "texts", "texts")]
    if spec == "wikitext":
        return [Source("hub", spec, WIKITEXT_HUB[0], "wikitext")]
    is_url = "://" in spec
    if GLOB_CHARACTERS.search(spec):
        return glob_sources(spec)
    if is_url or Path(spec).expanduser().exists():
        fs, path = filesystem(spec)
        if fs.isdir(path):
            return directory_sources(spec, fs, path)
        if fs.exists(path):
            return [file_source(spec, fs, path, PurePosixPath(path).name)]
    if is_url or looks_like_path(spec):
        raise PplError(f"data not found: {spec}", EXIT_DATA)
    if len(spec) > 200 or any(c.isspace() for c in spec):  # no dataset id has spaces
        raise PplError(f"data not found: {spec[:60]!r}{'...' if len(spec) > 60 else ''} is not a file, folder or dataset id (to score texts from Python: ppl_cli.score(texts))", EXIT_DATA)
    return [Source("hub", spec, spec, "hub")]


def looks_like_path(spec: str) -> bool:
    suffix = Path(strip_compression(spec)[0]).suffix.lower()
    return spec.startswith((".", "/", "~")) or "\\" in spec or suffix in FORMATS or spec.count("/") > 1


def filesystem(spec: str):
    """The fsspec filesystem and path of a local path or URL; a missing protocol package is a data error."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(spec)
    except (ImportError, ValueError) as e:
        raise PplError(f"cannot open {spec}: {first_line(e)}", EXIT_DATA) from None


def strip_compression(name: str) -> tuple[str, str | None]:
    for suffix, compression in COMPRESSIONS.items():
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], compression
    return name, None


def file_format(name: str) -> tuple[str | None, str | None]:
    """(format, compression) from a file name such as corpus.jsonl.zst; format None when unknown."""
    stem, compression = strip_compression(name)
    return FORMATS.get(PurePosixPath(stem).suffix.lower()), compression


def known_types() -> str:
    return ", ".join(sorted(FORMATS)) + " (each also as " + ", ".join(COMPRESSIONS) + ")"


def file_source(spec: str, fs, path: str, name: str, size: int | None = None) -> Source:
    fmt, compression = file_format(name)
    if fmt is None:
        suffix = PurePosixPath(strip_compression(name)[0]).suffix or "(none)"
        raise PplError(f"unknown file type {suffix} for {path}; known: {known_types()}, or a directory", EXIT_DATA)
    if size is None:
        size = fs.size(path)
    return Source("file", spec, name, fmt, compression, fs.unstrip_protocol(path) if "://" in spec else path, size)


def sort_key(relative: str) -> tuple[str, ...]:
    return PurePosixPath(relative).parts  # as pathlib sorts paths: part by part


def hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in PurePosixPath(relative).parts)


def directory_sources(spec: str, fs, path: str) -> list[Source]:
    """Every file of a known type below the directory (hidden ones skipped), if they share one format."""
    found = fs.find(path, detail=True)
    base = path.rstrip("/")
    files = {}
    for file, info in found.items():
        relative = file[len(base) + 1 :]
        fmt, _ = file_format(relative)
        if fmt is not None and not hidden(relative):
            files[relative] = (file, info.get("size"), fmt)
    if not files:
        raise PplError(f"no files of a known type in directory {spec} (known: {known_types()})", EXIT_DATA)
    formats: dict[str, list[str]] = {}
    for relative, (_, _, fmt) in files.items():
        formats.setdefault(fmt, []).append(relative)
    if len(formats) > 1:
        counts = ", ".join(f"{fmt}: {len(names)} file{'s' * (len(names) > 1)}" for fmt, names in sorted(formats.items()))
        example = sorted(formats.items(), key=lambda kv: -len(kv[1]))[0][1][0]
        pattern = spec.rstrip("/") + "/**/*" + "".join(PurePosixPath(strip_compression(example)[0]).suffixes[-1:])
        raise PplError(
            f"directory {spec} holds files of several formats ({counts}); choose one with a glob, e.g. --data '{pattern}*'",
            EXIT_DATA,
        )
    return [file_source(spec, fs, files[r][0], r, files[r][1]) for r in sorted(files, key=sort_key)]


def glob_sources(spec: str) -> list[Source]:
    """A quoted glob pattern, expanded here and sorted; names are relative to its fixed leading directory."""
    fs, pattern = filesystem(spec)
    parts = PurePosixPath(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if GLOB_CHARACTERS.search(part))
    base = str(PurePosixPath(*parts[:fixed])) if fixed else ""
    matches = fs.glob(pattern, detail=True)
    files = {}
    for file, info in matches.items():
        relative = file[len(base) :].lstrip("/") if base else file
        if info.get("type") != "directory" and not hidden(relative):
            files[relative] = (file, info.get("size"))
    if not files:
        raise PplError(f"no files match {spec}", EXIT_DATA)
    return [file_source(spec, fs, files[r][0], r, files[r][1]) for r in sorted(files, key=sort_key)]


def check_option_conflicts(sources: list[Source], config: Config) -> None:
    """Options that mean nothing for these sources are an error, not silently ignored."""
    hub = [s for s in sources if s.kind == "hub"]
    local = [s for s in sources if s.kind != "hub"]
    if local and (config.data_config or config.split):
        option = "--data-config" if config.data_config else "--split"
        raise PplError(f"{option} applies to hub datasets, not to {local[0].spec}")
    if config.streaming and not hub:
        raise PplError(f"--streaming applies to hub datasets, not to {sources[0].spec}")
    records = [s for s in sources if s.format in RECORD_FORMATS or s.format == "wikitext"]
    if records and config.doc_split != "file":
        raise PplError(f"--doc-split applies to plain text (.txt, directories, stdin), not to {records[0].spec}")
    texts = [s for s in sources if s.format not in RECORD_FORMATS and s.kind != "stdin"]
    if texts and config.words_field:
        raise PplError(f"--words-field reads a list of words from each record (JSON Lines, JSON, Parquet, hub datasets), not from {texts[0].spec}")


def open_binary(source: Source, counter: ByteCounter, stdin: BinaryIO | None = None) -> tuple[BinaryIO, Source]:
    """A decompressed binary stream of a file or of standard input, and the source with its format known.

    Reads through `counter`, which counts the bytes taken from storage (before decompression).
    """
    if source.kind == "stdin":
        raw = CountingReader(stdin if stdin is not None else sys.stdin.buffer, counter, owned=False)
        buffered = io.BufferedReader(raw, 1 << 16)
        head = buffered.peek(16)[:16]
        compression = next((name for magic, name in MAGIC if head.startswith(magic)), None)
        if compression == "bz2" and not re.match(rb"BZh[1-9]1AY&SY", head):
            compression = None
        stream = decompress(buffered, compression) if compression else buffered
        return stream, replace(source, compression=compression)
    fs, path = filesystem(source.url)
    try:
        raw = fs.open(path, "rb")
    except OSError as e:
        raise PplError(f"cannot read {source.url}: {e.strerror or first_line(e)}", EXIT_DATA) from None
    counted = io.BufferedReader(CountingReader(raw, counter), 1 << 20)
    return (decompress(counted, source.compression) if source.compression else counted), source


def open_seekable(source: Source, counter: ByteCounter) -> BinaryIO:
    """A seekable binary file, as Parquet needs; a compressed one is first decompressed to a temp file."""
    if not source.compression:
        fs, path = filesystem(source.url)
        return fs.open(path, "rb")
    import shutil
    import tempfile

    stream, _ = open_binary(source, counter)
    spool = tempfile.TemporaryFile()
    with stream:
        shutil.copyfileobj(stream, spool, 1 << 20)
    spool.seek(0)
    return spool


def decompress(stream: BinaryIO, compression: str) -> BinaryIO:
    if compression == "gzip":
        import gzip

        return gzip.GzipFile(fileobj=stream, mode="rb")
    if compression == "bz2":
        import bz2

        return bz2.BZ2File(stream)
    if compression == "xz":
        import lzma

        return lzma.LZMAFile(stream)
    try:
        from compression import zstd  # Python 3.14+
    except ImportError:
        from backports import zstd
    return zstd.ZstdFile(stream)


class ByteCounter:
    """Bytes read from storage so far; written by the reading thread, read by the progress bar."""

    def __init__(self):
        self.bytes = 0


class CountingReader(io.RawIOBase):
    """A raw stream that counts what passes through it."""

    def __init__(self, inner, counter: ByteCounter, owned: bool = True):
        self.inner = inner
        self.counter = counter
        self.owned = owned  # standard input is read, never closed
        self.read_some = getattr(inner, "read1", inner.read)  # what a pipe has now, not a full buffer

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.read_some(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.counter.bytes += n
        return n

    def close(self):
        if self.owned:
            self.inner.close()
        super().close()
