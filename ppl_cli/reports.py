"""Report writers: the output directory (append-only documents.jsonl, atomic whole files) and the
short human summary."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path

from .errors import EXIT_OUTPUT, PplError
from .metrics import METRIC_KEYS

RUN_FILE = "run.json"  # what the run is, to check a resume against
DOCUMENTS_FILE = "documents.jsonl"
CSV_FILE = "documents.csv"
SUMMARY_FILE = "summary.json"
OWN_FILES = (RUN_FILE, DOCUMENTS_FILE, CSV_FILE, SUMMARY_FILE)
RANK_PREFIX = "documents.rank-"
DOCUMENT_COLUMNS = ("index", "id", *METRIC_KEYS)


class RunDirectory:
    """An output directory that survives a kill at any moment.

    documents.jsonl gets one line per finished document (flushed and fsynced per group), so a
    restarted run skips them; every other file is written whole to a temp file and renamed.
    """

    def __init__(self, path: str, overwrite: bool, rank: int = 0, world: int = 1):
        self.path = Path(path)
        # Under torchrun each rank appends to its own file; rank 0 joins them at the end.
        self.appends_to = DOCUMENTS_FILE if world == 1 else f"{RANK_PREFIX}{rank}.jsonl"
        if rank != 0:
            return  # rank 0 checks and prepares the directory
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.path):
                pass
        except OSError as e:
            raise PplError(f"output directory {path} is not writable: {e.strerror}", EXIT_OUTPUT) from None
        if overwrite:
            for path in self.own_files():
                path.unlink()

    def begin(self, identity: dict) -> dict[int, dict]:
        """Record what this run is; return the documents an earlier run of it already finished."""
        run_file = self.path / RUN_FILE
        if not run_file.exists():
            if self.own_files():
                raise PplError(f"{self.path} holds results of another run; use --overwrite to replace them", EXIT_OUTPUT)
            write_atomic(run_file, json.dumps(identity, indent=2) + "\n")
            return {}
        try:
            previous = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise PplError(f"{run_file} is unreadable; use --overwrite to start afresh", EXIT_OUTPUT) from None
        key = differing_key(identity, previous)
        if key:
            raise PplError(
                f"{self.path} holds a run with a different {key} ({previous.get(key)!r}, now {identity.get(key)!r});"
                " use --overwrite to replace it or another -o",
                EXIT_OUTPUT,
            )
        return self.finished_documents()

    def rank_files(self) -> list[Path]:
        """documents.rank-R.jsonl of an unfinished torchrun run."""
        return sorted(self.path.glob(f"{RANK_PREFIX}*.jsonl"))

    def own_files(self) -> list[Path]:
        return [p for p in [self.path / name for name in OWN_FILES] + self.rank_files() if p.exists()]

    def finished_documents(self) -> dict[int, dict]:
        """Documents in documents.jsonl and the ranks' files of an interrupted torchrun run."""
        done = {}
        for path in [self.path / DOCUMENTS_FILE, *self.rank_files()]:
            if path.exists():
                done.update(read_lines(path))
        return done

    def append(self, rows: list[dict]) -> None:
        with open(self.path / self.appends_to, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def finish(self, summary: dict, documents: list[dict]) -> None:
        """Rewrite documents.jsonl in input order, then the CSV and the summary, each atomically."""
        write_atomic(self.path / DOCUMENTS_FILE, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents))
        for part in self.rank_files():
            part.unlink()
        write_atomic(self.path / CSV_FILE, documents_csv(documents))
        write_atomic(self.path / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")


def differing_key(a: dict, b: dict, skip: str | None = None) -> str | None:
    """The first key (in a's order, then b's) whose value differs between two run identities."""
    for key in [*a, *(k for k in b if k not in a)]:
        if key != skip and a.get(key) != b.get(key):
            return key
    return None


def read_lines(path: Path) -> dict[int, dict]:
    """Document lines by index; a torn last line (a kill mid-write) is cut off the file."""
    done, good_bytes = {}, 0
    with open(path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line)
                done[row["index"]] = row
            except (ValueError, KeyError, TypeError):
                break
            good_bytes += len(line)
    if good_bytes < path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good_bytes)
    return done


def write_atomic(path: Path, text: str) -> None:
    """Write to a temp file beside `path`, fsync, then rename over it: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def documents_csv(documents: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=DOCUMENT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(documents)
    return buffer.getvalue()


def format_summary(summary: dict) -> str:
    """A few lines for a person; summary.json has everything."""
    boot = summary.get("bootstrap") or {}

    def ci(key):
        interval = boot.get(key)
        return f"  (95% CI {number(interval[0])} - {number(interval[1])})" if interval else ""

    skipped = summary["skipped_documents"]
    lines = [
        f"{summary['model']['id']} on {summary['data']['source']}: {summary['documents']} documents"
        + (f" ({skipped} empty skipped)" if skipped else "")
        + f", {summary['tokens']:,} tokens scored",
        f"token perplexity  {number(summary['token_perplexity'])}{ci('token_perplexity')}"
        f"  macro mean {number(summary['macro_token_perplexity'])}",
        f"word perplexity   {number(summary['word_perplexity'])}",
        f"byte perplexity   {number(summary['byte_perplexity'])}",
        f"bits per byte     {number(summary['bits_per_byte'])}{ci('bits_per_byte')}",
        f"{summary['wall_time_s']:.1f} s in all, {summary['tokens_per_second'] or 0:,.0f} tokens/s scoring"
        + (f"; reports in {summary['config']['output']}" if summary["config"]["output"] else ""),
    ]
    return "\n".join(lines)


def number(value) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
