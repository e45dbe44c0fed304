"""--save-tokens: every scored token (and a conditional document's context) to Parquet, tokens/part-NNNNNNNNNNNN.parquet.

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
COLUMNS = ("index", "position", "token_id", "token", "logprob", "entropy", "rank")  # then z with --signals, ref_logprob, kld with a reference


def part_path(folder: Path, first_index: int, subdir: str = TOKENS_DIR) -> Path:
    return folder / subdir / f"part-{first_index:012d}.parquet"


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


VALUES = ("logprob", "entropy", "rank", "z", "ref_logprob", "kld")  # null on a context token


def document_table(index: int, positions: np.ndarray, tokens: dict[str, np.ndarray], pieces: TokenPieces, item=None) -> dict:
    """One document's columns: position in its token sequence, the token, log p, entropy, rank (and z).

    A document scored given a context (`item` has spans) gets every token of its sequence in
    position order, `scored` telling which were scored (the others are context: their values are
    null), and for a conversation the message (`turn`, its index) and `role` of each scored token.
    """
    n = len(positions)
    columns = {
        "index": np.full(n, index, dtype=np.int64),
        "position": positions.astype(np.int32),
        "token_id": tokens["token_id"].astype(np.int32),
        "logprob": (-tokens["nll"]).astype(np.float32),
    }
    for name in ("entropy", "rank"):  # an engine that returns no distribution has no entropy
        if name in tokens:
            columns[name] = tokens[name].astype(np.float32 if name == "entropy" else np.int32)
    if "z" in tokens:  # --signals: Min-K%++'s standardised log p
        columns["z"] = tokens["z"].astype(np.float32)
    if "ref_nll" in tokens:
        columns["ref_logprob"] = (-tokens["ref_nll"]).astype(np.float32)
        columns["kld"] = tokens["kld"].astype(np.float32)
    if item is not None and item.spans is not None:
        columns = with_context(columns, item)
    columns["token"] = pieces(columns["token_id"])
    order = ["index", "position", "token_id", "token", "scored", "turn", "role", *VALUES]
    return {name: columns[name] for name in order if name in columns}


def with_context(columns: dict, item) -> dict:
    """Every position of the sequence: the scored tokens' values where they are, context elsewhere."""
    n = len(item.ids)
    scored = np.zeros(n, dtype=bool)
    scored[columns["position"]] = True
    out = {
        "index": np.full(n, item.index, dtype=np.int64),
        "position": np.arange(n, dtype=np.int32),
        "token_id": item.ids.astype(np.int32),
        "scored": scored,
    }
    for name in VALUES:
        if name in columns:
            full = np.zeros(n, dtype=columns[name].dtype)
            full[columns["position"]] = columns[name]
            out[name] = full
    if item.spans[0].turn >= 0:
        turn = np.full(n, -1, dtype=np.int32)
        role = [None] * n
        for s in item.spans:
            turn[s.start : s.end] = s.turn
            role[s.start : s.end] = [s.role] * (s.end - s.start)
        out["turn"], out["role"] = turn, role
    return out


def write_part(folder: Path, tables: list[dict], subdir: str = TOKENS_DIR) -> None:
    """Documents' tables as one Parquet part of folder/subdir, written to a temp file and renamed."""
    import pyarrow as pa

    if not tables:
        return
    columns = {name: concat([t[name] for t in tables]) for name in tables[0]}
    if "scored" in columns:  # a context token's values are null, and so is its turn
        context = ~columns["scored"]
        for name in (*VALUES, "turn"):
            if name in columns:
                columns[name] = pa.array(columns[name], mask=context)
    for name, column in columns.items():  # NaN (a word without a surprisal) as null
        if isinstance(column, np.ndarray) and column.dtype.kind == "f":
            columns[name] = pa.array(column, from_pandas=True)
    table = pa.table(columns)
    path = part_path(folder, int(tables[0]["index"][0]), subdir)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with writing(path):
        path.parent.mkdir(exist_ok=True)
        write_parquet(table, tmp, path)


def write_parquet(table, tmp: Path, path: Path) -> None:
    """`table` to `tmp`, renamed to `path`; on failure the temp file is closed and removed (a
    full disk must not leave an open file behind in a long-lived process)."""
    import pyarrow.parquet as pq

    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def concat(parts: list):
    return sum(parts, []) if isinstance(parts[0], list) else np.concatenate(parts)


def keep_only_done(folder: Path, done: Iterable[int], subdirs: Iterable[str] = (TOKENS_DIR,)) -> None:
    """Cut every part of each folder/subdir (tokens/, words/) down to the documents whose rows are in
    documents.jsonl (a resumed run). The finished documents are marked in a bitmap of one byte a
    document index, read from `done` once and held meanwhile.
    """
    import pyarrow.parquet as pq

    parts = [part for subdir in subdirs for part in sorted((folder / subdir).glob("part-*.parquet"))]
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
            write_parquet(table, part.with_name(f".{part.name}.tmp"), part)


def copy_parts(sources: list[Path], target: Path, offsets: list[int] | None = None, subdir: str = TOKENS_DIR) -> None:
    """merge: the runs' parts into one folder (tokens/, words/), hard-linked where the filesystem allows; with
    `offsets` (runs over different data, one after the other) each part rewritten with its run's
    offset added to every index."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for k, source in enumerate(sources):
        offset = offsets[k] if offsets else 0
        for part in sorted((source / subdir).glob("part-*.parquet")):
            first = int(part.stem.removeprefix("part-"))
            destination = part_path(target, first + offset, subdir)
            with writing(destination):
                destination.parent.mkdir(exist_ok=True)
                if offset:
                    table = pq.read_table(part)
                    index = table.schema.get_field_index("index")
                    table = table.set_column(index, "index", pc.add(table["index"], pa.scalar(offset, pa.int64())))
                    write_parquet(table, destination.with_name(f".{destination.name}.tmp"), destination)
                    continue
                try:
                    os.link(part, destination)
                except OSError:
                    shutil.copyfile(part, destination)
