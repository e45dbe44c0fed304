"""The run directory: append-only documents.jsonl and the files beside it, atomic whole files, resume.

Torchrun ranks' files are joined here too."""

from __future__ import annotations

import contextlib
import csv
import heapq
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EXIT_OUTPUT, PplError
from .locking import LOCK_NAME, OutputLock
from .metrics import METRIC_KEYS
from .signals import SIGNALS

RUN_FILE = "run.json"  # what the run is, to check a resume against
DOCUMENTS_STEM = "documents"
DOCUMENTS_FILE = "documents.jsonl"
CONTEXTS_STEM = "contexts"  # contexts.jsonl: each document's NLL by the context its tokens had
REFERENCE_STEM = "reference"  # reference.jsonl: a --reference-model run's per-document histograms
ROW_STEMS = (DOCUMENTS_STEM, CONTEXTS_STEM, REFERENCE_STEM)  # the files of per-document lines, STEM.jsonl
CSV_FILE = "documents.csv"
SUMMARY_FILE = "summary.json"
SERIES_FILE = "series.json"  # a series' directory: its checkpoints, each a run directory beside it
OWN_FILES = (RUN_FILE, DOCUMENTS_FILE, CSV_FILE, SUMMARY_FILE)
UMASK = os.umask(0)
os.umask(UMASK)


def csv_columns(grouped: bool = False, signals: bool = False, reference: bool = False) -> tuple[str, ...]:
    """documents.csv's columns: a `group` column when grouped, the --signals when the run has them
    (reference_ratio with a reference model)."""
    chosen = [s for s in SIGNALS if signals and (reference or s != "reference_ratio")]
    return ("index", "id", *(("group",) if grouped else ()), *METRIC_KEYS, *chosen)


class WriteError(PplError):
    """An output file could not be written (a full disk, a quota, a read-only or vanished directory,
    an I/O error): one line naming the file and the cause, exit 5."""

    def __init__(self, path: str | Path, error: OSError):
        super().__init__(f"cannot write {path}: {reason(error)}", EXIT_OUTPUT)
        self.path = Path(path)


def reason(error: OSError) -> str:
    if error.strerror:
        return error.strerror
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an OSError while writing `path` into a WriteError naming it."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(path, e) from None


@dataclass
class Result:
    """summary.json as a dict, and the per-document rows, read back from documents.jsonl on demand."""

    summary: dict
    documents_file: Path | None
    spool: Any = None  # the temporary directory holding documents.jsonl when there is no -o

    def iter_documents(self) -> Iterator[dict]:
        """The rows of documents.jsonl in input order, one at a time."""
        if self.documents_file is None or not self.documents_file.exists():
            raise PplError("the per-document rows are not available in this process (use -o DIR)")
        return read_rows(self.documents_file)

    @property
    def documents(self) -> list[dict]:
        """Every row as a list (read from documents.jsonl each time; iter_documents() streams)."""
        return list(self.iter_documents())

    def tokens(self):
        """The saved tokens (save_tokens=True with output=DIR) as a pandas DataFrame, a row a token."""
        return self.saved("tokens", "save_tokens")

    def words(self):
        """The saved words (save_words=True with output=DIR) as a pandas DataFrame, a row a word."""
        return self.saved("words", "save_words")

    def saved(self, folder: str, keyword: str):
        """A folder of Parquet parts beside documents.jsonl, read whole, in document order."""
        path = self.documents_file.parent / folder if self.documents_file is not None else None
        if path is None or not path.is_dir() or not any(path.glob("*.parquet")):
            raise PplError(f"this run saved no {folder}: run it with --{keyword.replace('_', '-')} and -o/--output")
        import pandas as pd

        frame = pd.read_parquet(path)
        order = ["index", "position" if folder == "tokens" else "word_index"]
        return frame.sort_values(order, kind="stable").reset_index(drop=True)


class RunDirectory:
    """An output directory that survives a kill at any moment.

    documents.jsonl gets one line per finished document (flushed and fsynced per group), so a
    restarted run skips them; every other file is written whole to a temp file and renamed. Files
    of per-document lines beside it (reference.jsonl) are appended first, in the same way. Under
    torchrun each rank appends to its own STEM.rank-R.jsonl and rank 0 joins them at the end. Lines
    are joined in index order by merging the files' ascending runs, so nothing is held in memory.
    Without -o a temporary directory ("spool") holds documents.jsonl and nothing else.
    """

    def __init__(self, path: str | Path, overwrite: bool = False, rank: int = 0, world: int = 1, spool: bool = False):
        self.path = Path(path)
        self.spool = spool
        self.rank, self.world = rank, world
        self.snapshot: dict[str, int] = {}  # bytes of STEM.jsonl that an earlier run wrote
        self.last_index: dict[str, int] = {}  # the highest index appended to each STEM.jsonl so far
        self.in_order: dict[str, bool] = {}  # every line appended came after the ones before
        self.lock: OutputLock | None = None
        if rank != 0 or spool:
            return  # rank 0 checks, locks and prepares the directory for the ranks of its run
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.path):
                pass
        except OSError as e:
            raise PplError(f"output directory {path} is not writable: {e.strerror}", EXIT_OUTPUT) from None
        self.lock = OutputLock(self.path / LOCK_NAME, str(self.path)).acquire()
        if overwrite:
            with writing(self.path):
                for own in self.own_files():
                    own.unlink()

    def close(self) -> None:
        """Let another writer in."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def documents(self) -> Path:
        return self.path / DOCUMENTS_FILE

    def whole(self, stem: str) -> Path:
        return self.path / f"{stem}.jsonl"

    def rank_file(self, rank: int, stem: str = DOCUMENTS_STEM) -> Path:
        return self.path / f"{stem}.rank-{rank}.jsonl"

    def rank_files(self, stem: str | None = None) -> list[Path]:
        """STEM.rank-R.jsonl of an unfinished torchrun run (every stem's when none is named)."""
        stems = [stem] if stem else ROW_STEMS
        return sorted(p for s in stems for p in self.path.glob(f"{s}.rank-*.jsonl"))

    def row_files(self, stem: str = DOCUMENTS_STEM) -> list[Path]:
        return [p for p in [self.whole(stem), *self.rank_files(stem)] if p.exists()]

    def stems(self) -> list[str]:
        """documents, then the other kinds of per-document file this directory holds."""
        return [DOCUMENTS_STEM, *(stem for stem in ROW_STEMS[1:] if self.row_files(stem))]

    def own_files(self) -> list[Path]:
        files = [self.path / name for name in OWN_FILES] + [self.whole(s) for s in self.stems()] + self.rank_files()
        return sorted({p for p in files if p.exists()})

    def begin(self, identity: dict) -> None:
        """Record what this run is, or check it against the run already here; join what an earlier
        run left (rank files, lines out of order) into one STEM.jsonl each, in index order."""
        run_file = self.path / RUN_FILE
        if not run_file.exists():
            if self.own_files():
                raise PplError(f"{self.path} holds results of another run; use --overwrite to replace them", EXIT_OUTPUT)
            write_atomic(run_file, json.dumps(identity, indent=2) + "\n")
            return
        try:
            previous = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise PplError(f"{run_file} is unreadable; use --overwrite to start afresh", EXIT_OUTPUT) from None
        key = differing_key(identity, previous, skip=GROWING)
        if key:
            raise PplError(
                f"{self.path} holds a run with a different {key} ({previous.get(key)!r}, now {identity.get(key)!r});"
                " use --overwrite to replace it or another -o",
                EXIT_OUTPUT,
            )
        if previous.get(GROWING) != identity.get(GROWING):  # files edited since: each finished document is checked as it is read
            write_atomic(run_file, json.dumps(identity, indent=2) + "\n")
        for stem in self.stems():
            parts = self.row_files(stem)
            runs = {path: ascending_runs(path) for path in parts}
            if len(parts) > 1 or any(len(r) > 1 for r in runs.values()):
                with atomic_writer(self.whole(stem)) as out:
                    for row in merged_rows(runs):
                        out.write(json.dumps(row, ensure_ascii=False) + "\n")
                with writing(self.path):
                    for part in self.rank_files(stem):
                        part.unlink()
            if self.whole(stem).exists():
                self.snapshot[stem] = self.whole(stem).stat().st_size
                self.last_index[stem] = last_index(self.whole(stem))

    def finished(self, config: dict, inputs: dict) -> dict | None:
        """The summary of a run this directory already finished with this configuration (Config's
        to_dict(), speed options aside) and these inputs (run.json's input keys: the files' names
        and sizes), every row written; None otherwise (then the run goes on as a resumed one)."""
        if self.spool:
            return None
        try:
            summary = json.loads((self.path / SUMMARY_FILE).read_text(encoding="utf-8"))
            identity = json.loads((self.path / RUN_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        same = lambda a: {k: v for k, v in a.items() if k not in SPEED_OPTIONS}  # noqa: E731
        if same(config) != same(summary.get("config", {})) or any(identity.get(k) != v for k, v in inputs.items()):
            return None
        try:
            written = count_lines(self.documents)
        except OSError:
            return None
        return summary if written == summary.get("documents") else None

    def done_count(self) -> int:
        """How many rows an earlier run finished (the lines of documents.jsonl as begin() found it)."""
        size = self.snapshot.get(DOCUMENTS_STEM, 0)
        return count_lines(self.documents, size) if size else 0

    def done_rows(self) -> Iterator[dict]:
        """The rows an earlier run finished, in index order (read lazily, as the run goes)."""
        if not self.documents.exists():
            return iter(())
        return read_rows(self.documents, 0, self.snapshot.get(DOCUMENTS_STEM, self.documents.stat().st_size))

    def done_documents(self) -> Iterator[tuple[dict, str | None]]:
        """Each finished row with the digest its document had when it was scored (contexts.jsonl's
        `digest`; None from a run that did not record it), in index order."""
        contexts = self.whole(CONTEXTS_STEM)
        lines = read_rows(contexts, 0, self.snapshot[CONTEXTS_STEM]) if CONTEXTS_STEM in self.snapshot else iter(())
        line = next(lines, None)
        for row in self.done_rows():
            while line is not None and line["index"] < row["index"]:
                line = next(lines, None)
            yield row, line.get("digest") if line is not None and line["index"] == row["index"] else None

    def append(self, rows: list[dict], side: dict[str, list[dict]] | None = None) -> None:
        """A group's lines: the per-document files beside documents.jsonl first, then its rows, so a
        row on disk always has its other lines (a duplicate after a kill is dropped when joined)."""
        for stem, lines in (side or {}).items():
            self.append_lines(stem, lines)
        self.append_lines(DOCUMENTS_STEM, rows)

    def append_lines(self, stem: str, lines: list[dict]) -> None:
        target = self.whole(stem) if self.world == 1 else self.rank_file(self.rank, stem)
        last = self.last_index.get(stem, -1)
        for line in lines:
            if line["index"] <= last:
                self.in_order[stem] = False
            last = max(last, line["index"])
        append_bytes(target, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8"))
        self.last_index[stem] = last

    def finish(self, summarize: Callable[..., dict], given: dict[str, Iterable[dict]] | None = None, columns: Sequence[str] = csv_columns()) -> dict:
        """One pass over every per-document file in index order (the lines `given` for a stem, else
        the files here): each rewritten if it is not already one file in order, documents.csv (of
        `columns`), and summary.json from summarize(rows, **{other stem: its lines})."""
        given = given or {}
        stems = list(dict.fromkeys([*self.stems(), *given]))
        with contextlib.ExitStack() as files:
            streams = {}
            for stem in stems:
                parts = self.row_files(stem)
                rewrite = stem in given or parts != [self.whole(stem)] or not self.in_order.get(stem, True)
                lines = given.get(stem)
                if lines is None:
                    lines = merged_rows({p: ascending_runs(p) for p in parts}) if rewrite else read_rows(self.whole(stem))
                if rewrite:
                    lines = written(lines, files.enter_context(atomic_writer(self.whole(stem))))
                streams[stem] = lines
            if not self.spool:
                table = csv.DictWriter(
                    files.enter_context(atomic_writer(self.path / CSV_FILE)),
                    columns,
                    extrasaction="ignore",
                    lineterminator="\n",
                )
                table.writeheader()
                streams[DOCUMENTS_STEM] = tabled(streams[DOCUMENTS_STEM], table)
            rows = streams.pop(DOCUMENTS_STEM)
            summary = summarize(rows, **streams)
            for lines in streams.values():  # every file rewritten to its end, whether summarize read it or not
                for _ in lines:
                    pass
        with writing(self.path):
            for part in self.rank_files():
                part.unlink()
        if not self.spool:
            write_atomic(self.path / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        return summary


def append_bytes(path: Path, data: bytes) -> None:
    """Append whole lines and fsync them; on a failed write the file is cut back to where it was,
    so a full disk leaves no torn line (a kill can, and the next start cuts it off)."""
    with writing(path), open(path, "ab", buffering=0) as f:
        start = f.seek(0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[f.write(view) :]
            os.fsync(f.fileno())
        except OSError:
            with contextlib.suppress(OSError):
                f.truncate(start)
            raise


def written(lines: Iterable[dict], out) -> Iterator[dict]:
    for line in lines:
        out.write(json.dumps(line, ensure_ascii=False) + "\n")
        yield line


def tabled(rows: Iterable[dict], table) -> Iterator[dict]:
    for row in rows:
        table.writerow(row)
        yield row


SPEED_OPTIONS = ("overwrite", "threads", "max_batch_tokens", "concurrency")  # options a finished run's numbers do not depend on
GROWING = "data_files"  # may change between a run and its resumption: the finished documents' digests are checked instead


def differing_key(a: dict, b: dict, skip: str | None = None) -> str | None:
    """The first key (in a's order, then b's) whose value differs between two run identities."""
    for key in [*a, *(k for k in b if k not in a)]:
        if key != skip and a.get(key) != b.get(key):
            return key
    return None


def ascending_runs(path: Path) -> list[tuple[int, int]]:
    """Byte ranges of the file's runs of rows in increasing index order; a torn last line (a kill
    mid-write) is cut off the file."""
    runs, start, offset, last = [], 0, 0, None
    with open(path, "rb") as f:
        for line in f:
            try:
                index = json.loads(line)["index"]
            except (ValueError, KeyError, TypeError):
                break
            if last is not None and index <= last:
                runs.append((start, offset))
                start = offset
            last, offset = index, offset + len(line)
    if offset < path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(offset)
    if offset > start:
        runs.append((start, offset))
    return runs


def read_rows(path: Path, start: int = 0, end: int | None = None) -> Iterator[dict]:
    """The rows in bytes [start, end) of a documents file."""
    with open(path, "rb") as f:
        f.seek(start)
        position = start
        for line in f:
            if end is not None and position >= end:
                return
            position += len(line)
            yield json.loads(line)


def merged_rows(runs: dict[Path, list[tuple[int, int]]]) -> Iterator[dict]:
    """Rows of several ascending runs merged in index order; an index seen twice is kept once."""
    streams = [read_rows(path, start, end) for path, ranges in runs.items() for start, end in ranges]
    last = None
    for row in heapq.merge(*streams, key=lambda row: row["index"]):
        if row["index"] != last:
            yield row
            last = row["index"]


def count_lines(path: Path, size: int | None = None) -> int:
    """The lines of a file (of its first `size` bytes), read a MiB at a time."""
    count = 0
    with open(path, "rb") as f:
        left = size if size is not None else os.fstat(f.fileno()).st_size
        while left > 0 and (chunk := f.read(min(left, 1 << 20))):
            count += chunk.count(b"\n")
            left -= len(chunk)
    return count


def last_index(path: Path) -> int:
    """The index of the last row of a documents file (-1 when empty)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - (1 << 16)))
        tail = f.read().splitlines()
    for line in reversed(tail):
        try:
            return json.loads(line)["index"]
        except (ValueError, KeyError, TypeError):
            continue
    return max((row["index"] for row in read_rows(path)), default=-1)


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator:
    """A text file beside `path`, fsynced and renamed over it on success: readers never see half a
    file. A failed write is a WriteError naming `path`; the temp file is removed."""
    with writing(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with writing(path):
            os.chmod(tmp, 0o666 & ~UMASK)  # as open() would make it, not mkstemp's 0600
        f = os.fdopen(fd, "w", encoding="utf-8", newline="")
        try:
            yield GuardedText(f, path)
            with writing(path):
                f.flush()
                os.fsync(f.fileno())
        finally:
            with contextlib.suppress(OSError):  # after a failed write, closing cannot flush either
                f.close()
        with writing(path):
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class GuardedText:
    """A text file whose write() raises WriteError(path) for an OSError (what csv and json.dump call)."""

    def __init__(self, file, path: Path):
        self.file, self.path = file, path

    def write(self, text: str) -> int:
        with writing(self.path):
            return self.file.write(text)


def write_atomic(path: Path, text: str) -> None:
    with atomic_writer(path) as f:
        f.write(text)
