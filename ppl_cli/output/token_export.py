"""--save-tokens: every scored token to Parquet, tokens/part-NNNNNNNNNNNN.parquet, as the run goes.

Each group of documents writes one part (named by its first document's index) before its rows go
to documents.jsonl, atomically (a temp file renamed). A kill can leave a part whose documents have
no row yet: when the run starts again, every part is cut down to the documents in documents.jsonl
(those others are scored again and written anew), so no token is missing or written twice.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .run_directory import writing

TOKENS_DIR = "tokens"
COLUMNS = ("index", "position", "token_id", "token", "logprob", "entropy", "rank")  # then ref_logprob, kld with a reference


def part_path(folder: Path, first_index: int) -> Path:
    return folder / TOKENS_DIR / f"part-{first_index:012d}.parquet"


class TokenPieces:
    """Each token id's text, decoded once (a token that is part of a character reads as U+FFFD)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids: np.ndarray) -> list[str]:
        out = []
        for token_id in ids.tolist():
            piece = self.cache.get(token_id)
            if piece is None:
                piece = self.cache[token_id] = self.tokenizer.decode([token_id])
            out.append(piece)
        return out


def document_table(index: int, positions: np.ndarray, tokens: dict[str, np.ndarray], pieces: TokenPieces) -> dict:
    """One document's columns: position in its token sequence, the token, log p, entropy, rank."""
    n = len(positions)
    columns = {
        "index": np.full(n, index, dtype=np.int64),
        "position": positions.astype(np.int32),
        "token_id": tokens["token_id"].astype(np.int32),
        "token": pieces(tokens["token_id"]),
        "logprob": (-tokens["nll"]).astype(np.float32),
        "entropy": tokens["entropy"].astype(np.float32),
        "rank": tokens["rank"].astype(np.int32),
    }
    if "ref_nll" in tokens:
        columns["ref_logprob"] = (-tokens["ref_nll"]).astype(np.float32)
        columns["kld"] = tokens["kld"].astype(np.float32)
    return columns


def write_part(folder: Path, tables: list[dict]) -> None:
    """One group's documents as one Parquet part, written to a temp file and renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not tables:
        return
    table = pa.table({name: concat([t[name] for t in tables]) for name in tables[0]})
    path = part_path(folder, int(tables[0]["index"][0]))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with writing(path):
            path.parent.mkdir(exist_ok=True)
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def concat(parts: list):
    return sum(parts, []) if isinstance(parts[0], list) else np.concatenate(parts)


def keep_only_done(folder: Path, done: Iterable[int]) -> None:
    """Cut every part down to the documents whose rows are in documents.jsonl (a resumed run).

    The finished documents are marked in a bitmap of one byte a document index, held meanwhile.
    """
    import pyarrow.parquet as pq

    parts = sorted((folder / TOKENS_DIR).glob("part-*.parquet"))
    if not parts:
        return
    indices = np.fromiter(done, dtype=np.int64)
    finished = np.zeros(int(indices.max(initial=-1)) + 1, dtype=bool)
    finished[indices] = True
    del indices
    for part in parts:
        index = pq.read_table(part, columns=["index"]).column("index").to_numpy()
        keep = (index < len(finished)) & finished[np.minimum(index, len(finished) - 1)] if len(finished) else np.zeros(len(index), bool)
        if keep.all():
            continue
        table = pq.read_table(part).filter(keep)
        with writing(part):
            if table.num_rows == 0:
                part.unlink()
                continue
            tmp = part.with_name(f".{part.name}.tmp")
            pq.write_table(table, tmp, compression="zstd")
            os.replace(tmp, part)


def copy_parts(sources: list[Path], target: Path) -> None:
    """merge: the shards' parts into one tokens/ folder (hard links where the filesystem allows)."""
    for source in sources:
        for part in sorted((source / TOKENS_DIR).glob("part-*.parquet")):
            destination = target / TOKENS_DIR / part.name
            with writing(destination):
                destination.parent.mkdir(exist_ok=True)
                try:
                    os.link(part, destination)
                except OSError:
                    shutil.copyfile(part, destination)
