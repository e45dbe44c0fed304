"""evaluate(config): the stages wired together.

sources -> documents (a stream) -> token ids (a background thread) -> groups of windows -> scorer
-> per-document rows (appended to documents.jsonl) -> one pass over the rows -> summary.json.
Memory follows the work in flight, not the corpus: nothing holds every document or every row.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import Config
from .data.documents import DocumentStream, add_fingerprints, fingerprint
from .data.sharding import share
from .data.sources import resolve_sources
from .engine.conventions import JOINED_CONVENTIONS, resolve_windowing
from .errors import PplError
from .output.run_directory import Result, RunDirectory
from .output.summary import build_summary, data_description, run_identity
from .output.token_export import keep_only_done
from .runtime.signals import Interrupted, stop_signals


def evaluate(config: Config, progress: bool = False, stdin=None) -> Result:
    """Score every document of config.data with config.model; write reports if config.output is set.

    Under torchrun each rank scores its share and rank 0 writes the reports; every rank returns
    the same summary.
    """
    from .runtime import distributed

    ranks = distributed.start()
    finished = False
    try:
        result = evaluate_ranks(config, ranks, progress, stdin)
        finished = True
        return result
    finally:
        distributed.stop(ranks, finished)


def evaluate_ranks(config: Config, ranks, progress: bool, stdin) -> Result:
    import torch

    from .engine.loading import load_model, load_reference
    from .engine.scorer import Scorer
    from .engine.tokenizing import background, batch_encoder, joined_document, token_ids, tokenize_documents
    from .output.rows import score_stream
    from .runtime.progress import Progress

    started = time.perf_counter()
    if ranks.world > 1 and "-" in config.data:
        raise PplError("--data - (standard input) cannot be shared between torchrun ranks; use a file")
    sources = resolve_sources(config)
    joined = config.convention in JOINED_CONVENTIONS
    stream = DocumentStream(sources, config, share(config.shard, ranks.rank, ranks.world, joined), stdin)
    stream.check()
    run_dir, spool = open_run_directory(config, ranks)
    if config.threads:
        torch.set_num_threads(config.threads)
    lm = load_model(config, ranks.local_rank)
    windowing = resolve_windowing(config, lm)
    ref = load_reference(config, windowing, lm.tokenizer, ranks.local_rank) if config.reference_model else None
    identity = run_identity(config, lm.info, sources, windowing, ref and ref.info)
    begin_run(run_dir, ranks, identity)

    batch_tokens = config.max_batch_tokens or default_batch_tokens(lm.device, windowing.window)
    reference = Scorer(ref.model, ref.device, batch_tokens) if ref else None
    scorer = Scorer(lm.model, lm.device, batch_tokens, reference, keep=kept_token_values(config))
    write_tokens = token_writer(run_dir.path, lm.tokenizer) if config.save_tokens else None
    encode = batch_encoder(lm.tokenizer)
    stage = joined_document if joined else tokenize_documents
    bar = Progress(stream, config.limit, progress and ranks.main)
    scoring_started = time.perf_counter()
    try:
        with stop_signals() as stop, background(stage(stream, encode, windowing, run_dir.done_rows())) as items:
            retokenize = lambda item: item._replace(ids=token_ids(encode, [item.document.text], windowing)[0])  # noqa: E731
            tally = score_stream(scorer, items, windowing, run_dir.append, bar, stop, retokenize, write_tokens)
    except Interrupted as e:
        raise stopped(e.signum, bar.documents, run_dir) from None
    finally:
        bar.close()
    scoring_time = time.perf_counter() - scoring_started

    parts = ranks.gather((tally, stream.digest, stream.count))
    summary = None
    if ranks.main:
        missing = [r for r, (t, _, _) in enumerate(parts) if t.scored and ranks.world > 1 and not run_dir.rank_file(r).exists()]
        if missing:
            raise PplError(f"{run_dir.rank_file(missing[0])} is missing: is {run_dir.path} on a filesystem every node shares?")
        data_info = data_description(sources, config, max(n for _, _, n in parts), add_fingerprints(fingerprint(d) for _, d, _ in parts))

        def summarize(rows, reference=(), contexts=()):
            timings = {
                "wall_time_s": time.perf_counter() - started,
                "scoring_time_s": scoring_time,
                "scored_now": sum(t.tokens for t, _, _ in parts),
            }
            skipped = sum(t.skipped for t, _, _ in parts)
            summary = build_summary(config, rows, skipped, lm.info, data_info, windowing, timings, ref and ref.info, reference, contexts)
            return {**summary, "ranks": ranks.world}

        summary = run_dir.finish(summarize)
    summary = ranks.broadcast(summary)
    return Result(summary, run_dir.documents, spool)


def kept_token_values(config: Config) -> tuple[str, ...]:
    """The per-token values the scorer hands back: the NLL (for contexts.jsonl), a reference's KL
    and delta p (reference.jsonl), and for --save-tokens entropy and rank too."""
    keep = ["nll"]
    if config.reference_model:
        keep += ["kld", "delta_p"] + (["ref_nll"] if config.save_tokens else [])
    if config.save_tokens:
        keep += ["entropy", "rank"]
    return tuple(keep)


def token_writer(folder: Path, tokenizer):
    """--save-tokens: each group's documents -> one Parquet part."""
    from .output.token_export import TokenPieces, document_table, write_part

    pieces = TokenPieces(tokenizer)
    return lambda documents: write_part(folder, [document_table(i, positions, values, pieces) for i, positions, values in documents])


def open_run_directory(config: Config, ranks) -> tuple[RunDirectory, Any]:
    """The output directory, or without -o a temporary one for the rows (shared by the ranks of one node)."""
    if config.output:
        return RunDirectory(config.output, config.overwrite, ranks.rank, ranks.world), None
    if ranks.world > 1 and os.environ.get("LOCAL_WORLD_SIZE", str(ranks.world)) != str(ranks.world):
        raise PplError("torchrun over several nodes needs -o DIR on a filesystem every node shares")
    spool = tempfile.TemporaryDirectory(prefix="ppl-eval-") if ranks.main else None
    path = ranks.broadcast(spool.name if spool else None)
    return RunDirectory(path, rank=ranks.rank, world=ranks.world, spool=True), spool


def begin_run(run_dir: RunDirectory, ranks, identity: dict) -> None:
    """Rank 0 checks the output directory against this run; then every rank may read what is done."""
    status = None
    if ranks.main and not run_dir.spool:
        try:
            run_dir.begin(identity)
            if identity["save_tokens"]:  # parts of documents whose rows a kill cut off are written anew
                keep_only_done(run_dir.path, (row["index"] for row in run_dir.done_rows()))
        except PplError as e:
            status = (str(e), e.exit_code)
    status = ranks.broadcast(status)
    if status:
        raise PplError(*status)


def stopped(signum: int, documents: int, run_dir: RunDirectory) -> PplError:
    import signal

    name = signal.Signals(signum).name
    if run_dir.spool:
        return PplError(f"stopped by {name}: {documents} documents were scored but not saved (use -o DIR to keep them)", 128 + signum)
    return PplError(f"stopped by {name}: {documents} documents are saved in {run_dir.path}; run the same command to resume", 128 + signum)


def default_batch_tokens(device, window: int) -> int:
    """Tokens per batch. On CPU one full window (larger batches measured slower: the matmuls are
    already compute-bound and bigger activations fall out of cache); on GPU many (OOM halves it)."""
    return max(window, 65536) if device.type == "cuda" else window
