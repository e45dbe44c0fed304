"""evaluate(config): the stages wired together.

sources -> documents (a stream) -> token ids (a background thread) -> groups of windows -> engine
-> per-document rows (appended to documents.jsonl) -> one pass over the rows -> summary.json.
Memory follows the work in flight, not the corpus: nothing holds every document or every row.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import Config
from .data.documents import DocumentStream, add_fingerprints, fingerprint
from .data.records import BadRecords
from .data.sampling import sampled
from .data.sharding import share
from .data.sources import resolve_sources
from .engine.conventions import JOINED_CONVENTIONS, prefix, resolve_windowing, start_line
from .errors import EXIT_DATA, EXIT_MODEL, EXIT_SERVER, PplError, PplWarning, Stopped
from .output.run_directory import Result, RunDirectory, WriteError, csv_columns, read_rows
from .output.summary import Unscored, build_summary, counted, data_description, input_identity, nothing_scored, run_identity
from .output.token_export import TOKENS_DIR, keep_only_done
from .output.word_export import WORDS_DIR
from .runtime.signals import Interrupted, stop_signals

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    """What the caller of evaluate() brings besides the configuration."""

    progress: bool = False
    stdin: Any = None
    on_rows: Callable[[list[dict]], None] | None = None
    model: Any = None  # a model in memory (any device, dtype or device map), scored as it is
    tokenizer: Any = None
    texts: Any = None  # the records of a list of texts given from Python (api.score), read as --data python:...


@dataclass
class Setup:
    """What a run has before its model loads, passed on whole."""

    config: Config
    ranks: Any
    sources: list
    stream: DocumentStream
    run_dir: RunDirectory
    spool: Any
    plan: Any  # the sample, for --sample and --sample-per-group
    started: float


def evaluate(
    config: Config, progress: bool = False, stdin=None, on_rows: Callable[[list[dict]], None] | None = None, model=None, tokenizer=None,
    texts=None,
) -> Result:  # fmt: skip
    """Score every document of config.data with config.model, or with `model` and `tokenizer`
    already in memory (left as they were found: mode, attention, gradients); write reports if
    config.output is set. `texts`: the records a `python:` data spec reads (api.score makes both).

    `on_rows` gets every document's row, in input order, as soon as it is final (`--jsonl`). Under
    torchrun each rank scores its share and rank 0 writes the reports (and hands the rows to
    `on_rows` as it joins the ranks' files, at the end); every rank returns the same summary.
    A series of models (several, a glob, --revisions) is evaluate_series's.
    """
    from .runtime import distributed
    from .runtime.progress import library_bars

    if config.is_series:
        raise PplError("this configuration names a series of models; score it with ppl_cli.evaluate_series(config)")
    caller = Caller(progress, stdin, on_rows, model, tokenizer, texts)
    ranks = distributed.start()
    finished = False
    try:
        with library_bars():
            result = evaluate_ranks(config, ranks, caller)
        finished = True
        return result
    finally:
        distributed.stop(ranks, finished)


def evaluate_ranks(config: Config, ranks, caller: Caller) -> Result:
    started = time.perf_counter()
    if ranks.world > 1 and "-" in config.data:
        raise PplError("--data - (standard input) cannot be shared between torchrun ranks; use a file")
    if ranks.world > 1 and config.device_map:
        raise PplError("--device-map spreads one model over the GPUs; under torchrun each rank has its own GPU (--device auto)")
    if ranks.world > 1 and config.engine == "vllm":
        raise PplError("--engine vllm runs one engine over the GPUs it is given (--tensor-parallel-size); split the data with --shard I/N job arrays, not torchrun")
    if ranks.world > 1 and config.engine == "served":
        raise PplError("a served model needs no torchrun: --concurrency keeps its server busy (or --shard I/N job arrays)")
    sources = resolve_sources(config)
    plan = sample_plan(config, sources, caller.texts) if config.sampled else None
    mine = sampled(share(config.shard, ranks.rank, ranks.world, joined_convention(config)), plan)
    stream = DocumentStream(sources, config, mine, caller.stdin, texts=caller.texts)
    stream.check()
    run_dir, spool = open_run_directory(config, ranks)
    if ranks.world == 1 and caller.model is None and not config.overwrite and all(s.kind == "file" for s in sources):  # inputs known by name and size
        summary = run_dir.finished(config.to_dict(), input_identity(sources, config))
        if summary is not None:
            run_dir.close()
            return finished_result(summary, run_dir, caller)
    setup = Setup(config, ranks, sources, stream, run_dir, spool, plan, started)
    try:
        return score_into(setup, caller)
    except WriteError as e:
        raise PplError(resumable(e, run_dir), e.exit_code) from None
    finally:
        run_dir.close()


def score_into(setup: Setup, caller: Caller) -> Result:
    """Load the model (or take the caller's) for its engine, score this process's documents into
    the run directory, and (rank 0) write the summary."""
    from .engine.vllm_engine import from_llm, is_vllm, open_model

    config, ranks = setup.config, setup.ranks
    if caller.model is not None and is_vllm(caller.model):
        setup.config = config.replace(engine="vllm")
        return score_with(setup, caller, from_llm(caller.model, caller.tokenizer, setup.config))
    if config.engine in ("vllm", "served"):
        from .engine.served_engine import open_served

        lm = open_model(config) if config.engine == "vllm" else open_served(config)
        reachable_lengths(setup, caller, lm.tokenizer)
        return score_with(setup, caller, lm)
    import torch

    from .engine.loading import in_memory, load_model, load_tokenizer, state_kept

    if config.threads:
        torch.set_num_threads(config.threads)
    if caller.model is None:  # a tokenizer alone: one already loaded for this model (a series shares one)
        tokenizer = caller.tokenizer
        if length_scan(setup):
            tokenizer = tokenizer or load_tokenizer(config)
            reachable_lengths(setup, caller, tokenizer)
        return score_with(setup, caller, load_model(config, ranks.local_rank, tokenizer))
    with state_kept(caller.model):
        return score_with(setup, caller, in_memory(caller.model, caller.tokenizer, config))


def finished_result(summary: dict, run_dir: RunDirectory, caller: Caller) -> Result:
    """A finished run's Result, from its files, its model not loaded; --jsonl's rows from documents.jsonl."""
    logger.info("every document is scored already in %s: its summary stands (--overwrite scores them again)", run_dir.path)
    if caller.on_rows is not None:
        for _ in handed_on(read_rows(run_dir.documents), caller.on_rows):
            pass
    return Result(summary, run_dir.documents, None)


def length_scan(setup: Setup) -> bool:
    """Whether --lengths' prefix protocol can read its input before the model loads, to find a file
    of documents too short for it at once: a whole run of re-readable data (not stdin, not a stream)."""
    config = setup.config
    return bool(config.lengths) and config.stride is None and not (config.shard or setup.ranks.world > 1 or "-" in config.data or config.streaming or config.sampled)


def reachable_lengths(setup: Setup, caller: Caller, tokenizer) -> None:
    """Read and tokenize documents until one has the tokens --lengths' prefix protocol needs; where
    none has, the run's error now, before a model loads (a corpus of short paragraphs)."""
    from .engine.conventions import start_token, tokens_needed
    from .engine.loading import bos_token_id
    from .engine.tokenizing import TOKENIZE_BATCH, Encoder

    if not length_scan(setup):
        return
    config = setup.config
    bar = tokens_needed("prefix", config.min_tokens or config.lengths[-1], config.lengths)  # the prefix protocol's, its window the largest length
    starts = config.bos_token is not None or (config.add_bos if config.add_bos is not None else bos_token_id(tokenizer) is not None)
    if config.bos_token:
        start_token(config.bos_token, tokenizer)
    encode = Encoder(tokenizer)
    skipped = short = longest = 0
    pending: list[str] = []

    def reached() -> bool:
        nonlocal short, longest
        for ids in encode(pending):
            longest = max(longest, len(ids) + starts)
            short += 1
        pending.clear()
        return longest >= bar

    scan = DocumentStream(setup.sources, config, texts=caller.texts)
    for _, doc in scan:
        if not doc.text.strip():
            skipped += 1
            continue
        pending.append(doc.text)
        if len(pending) == TOKENIZE_BATCH and reached():
            return
    if (pending and reached()) or not short:
        return
    raise PplError(nothing_scored(", ".join(config.data), skipped + short, short, longest, config.lengths, bar), EXIT_DATA)


def score_with(setup: Setup, caller: Caller, lm) -> Result:
    """Score with `lm`: a model loaded for the transformers engine (LoadedModel), one vLLM is about to
    run (VllmModel), or one behind a server (ServedModel)."""
    from .engine.loading import load_reference

    config, run_dir, ranks = setup.config, setup.run_dir, setup.ranks
    windowing = resolve_windowing(config, lm)
    line = start_line(windowing, config, lm.tokenizer)
    if line and ranks.main:
        logger.info(line)
    ref = load_reference(config, windowing, lm.tokenizer, ranks.local_rank) if config.reference_model else None
    conditional = conditional_sequences(config, lm, windowing)
    words = word_export(config, lm, windowing, run_dir)
    identity = run_identity(config, lm.info, setup.sources, windowing, ref and ref.info, conditional and conditional.identity, words and words.identity)
    begin_run(run_dir, ranks, identity)
    with stop_signals() as stop:  # from here to the summary: a stop keeps what is finished, and after the last document lets the run end whole
        try:
            engine = start_engine(config, lm, windowing, ref, words, own=caller.model is None)
        except PplError:  # vLLM's processes got the terminal's Ctrl-C too, and did not start
            if stop.signum is None:
                raise
            raise stopped(stop.signum, 0 if run_dir.spool else run_dir.done_count(), run_dir) from None
        try:
            windowing = length_passes(windowing, engine)
            return score_run(setup, caller, lm, engine, Scoring(windowing, conditional, words, ref), stop)
        finally:
            engine.close()


@dataclass(frozen=True)
class Scoring:
    """What a run scores with, besides its model: the windowing and the run's extras (None where not asked for)."""

    windowing: Any
    conditional: Any  # ConditionalRun
    words: Any  # WordRun
    ref: Any  # the reference model (LoadedModel)


def start_engine(config: Config, lm, windowing, ref, words, own: bool):
    """The engine that scores the windows: vLLM's or a server's (lm.start), else the transformers
    engine over lm (and the reference model beside it). `own`: the model is ours, and the process too."""
    from .engine.base import WHOLE_DISTRIBUTION

    keep = kept_token_values(config, words is not None and words.classes is not None)
    batch_tokens = config.max_batch_tokens
    if config.engine in ("vllm", "served"):
        engine = lm.start(config, windowing.window, keep, batch_tokens)
    else:
        from .engine.length_probe import configured_dependence
        from .engine.transformers_engine import TransformersEngine

        batch_tokens = batch_tokens or default_batch_tokens(lm.device, windowing.window)
        reference = TransformersEngine(ref.model, ref.device, batch_tokens, tune_memory=own) if ref else None
        engine = TransformersEngine(
            lm.model, lm.device, batch_tokens, reference, keep=keep, tune_memory=own, one_window=lm.one_window,
            fresh_positions=configured_dependence(lm.model) is not None, word_classes=words and words.classes,
        )  # fmt: skip
    missing = list(dict.fromkeys(WHOLE_DISTRIBUTION[value] for value in keep if value not in engine.keeps and value in WHOLE_DISTRIBUTION))
    if missing:
        named = ", ".join(missing[:-1]) + (" and " if len(missing) > 1 else "") + missing[-1]
        warnings.warn(
            f"{named} need each position's whole distribution, which --engine {engine.name} does not return: left out (null)",
            PplWarning,
            stacklevel=2,
        )
    return engine


def score_run(setup: Setup, caller: Caller, lm, engine, scoring: Scoring, stop) -> Result:
    from .engine.tokenizing import Encoder, ReadTally, background, joined_document, tallied, tokenize_batch, tokenize_documents
    from .output.rows import RowExtras, RowSink, Tally, score_stream
    from .runtime.progress import Progress

    config, ranks, run_dir, stream = setup.config, setup.ranks, setup.run_dir, setup.stream
    windowing, conditional, words, ref = scoring.windowing, scoring.conditional, scoring.words, scoring.ref
    write_tokens = token_writer(run_dir.path, lm.tokenizer) if config.save_tokens else None
    encode = Encoder(lm.tokenizer, offsets=config.save_words)
    if (windowing.lengths or config.save_words) and not encode.has_offsets:
        raise PplError(f"{'--lengths' if windowing.lengths else '--save-words'} needs a fast tokenizer (one with character offsets), and this model's has none")
    sink = RowSink(run_dir.append, caller.on_rows if ranks.world == 1 else None)
    read, tally = ReadTally(), Tally()
    bar = Progress(read, None if config.limit else stream.total_bytes, caller.progress and ranks.main)
    sequences = conditional and conditional.sequences
    scoring_started = time.perf_counter()
    try:
        if joined_convention(config):
            batches = joined_document(stream, encode, windowing, run_dir.done_documents())
        else:
            batches = tokenize_documents(stream, encode, windowing, run_dir.done_documents(), sequences, stream.bad if config.skip_bad_records else None)
        with background(tallied(batches, read, stream.counter, windowing)) as items:
            retokenize = lambda item: tokenize_batch([(item.index, item.document, None)], encode, windowing, sequences)[0]  # noqa: E731
            extras = RowExtras(write_tokens, config.min_k if config.signals else None, words and words.export)
            score_stream(engine, items, windowing, sink, bar, stop, retokenize, extras, tally)
    except Interrupted as e:
        if not (read.finished and bar.documents >= read.documents):  # a stop after the last document: the run is whole
            raise stopped(e.signum, bar.documents, run_dir) from None
    except PplError as e:
        if isinstance(e, (WriteError, Stopped)) or e.exit_code not in (EXIT_MODEL, EXIT_SERVER):
            raise
        raise PplError(resumable(e, run_dir), e.exit_code) from None
    finally:
        bar.close()
    scoring_time = time.perf_counter() - scoring_started

    parts = ranks.gather((tally, stream.digest, stream.count, stream.bad.describe()))
    summary, failure = None, None
    if ranks.main:
        missing = [r for r, (t, *_) in enumerate(parts) if t.scored and ranks.world > 1 and not run_dir.rank_file(r).exists()]
        if missing:
            raise PplError(f"{run_dir.rank_file(missing[0])} is missing: is {run_dir.path} on a filesystem every node shares?")
        sampling = setup.plan.describe() if setup.plan is not None else None
        documents = max(n for _, _, n, _ in parts)
        data_info = data_description(setup.sources, config, documents, add_fingerprints(fingerprint(d) for _, d, _, _ in parts), sampling)
        skipped = sum((t.skipped for t, *_ in parts), Counter())
        unscored = Unscored(
            sum(t.short for t, *_ in parts), BadRecords.joined([b for *_, b in parts]) if config.skip_bad_records else None, max(t.longest_short for t, *_ in parts)
        )

        def summarize(rows, reference=(), contexts=()):
            timings = {
                "wall_time_s": time.perf_counter() - setup.started,
                "scoring_time_s": scoring_time,
                "scored_now": sum(t.tokens for t, *_ in parts),
            }
            if caller.on_rows is not None and ranks.world > 1:
                rows = handed_on(rows, caller.on_rows)
            summary = build_summary(config, rows, skipped, lm.info, data_info, windowing, timings, ref and ref.info, reference, contexts, unscored)
            check_something_scored(summary, config, windowing)
            return {**summary, **({"bow_correction": words.described} if words else {}), "ranks": ranks.world}

        try:
            summary = run_dir.finish(summarize, columns=csv_columns(config.group_by is not None, config.signals, config.reference_model is not None))
        except PplError as e:  # every rank raises it, not rank 0 alone while the others wait
            failure = (resumable(e, run_dir), e.exit_code)
    summary, failure = ranks.broadcast((summary, failure))
    if failure:
        raise PplError(*failure)
    return Result(summary, run_dir.documents, setup.spool)


def length_passes(windowing, engine):
    """--lengths' prefix protocol: one pass at the largest length, or a pass per length where the
    model's logits depend on the input's length (said in one line, and recorded in the windowing;
    the transformers engine then resets the model's position scaling before each pass)."""
    if windowing.protocol != "prefix" or len(windowing.lengths) < 2:
        return windowing
    why = engine.length_dependence(windowing.lengths[0], windowing.lengths[-1])
    if why is None:
        return windowing
    warnings.warn(f"--lengths: each length is scored in its own pass, because {why}", PplWarning, stacklevel=2)
    engine.fresh_positions = True
    return replace(windowing, per_length=True, length_dependence=why)


def sample_plan(config: Config, sources, texts=None):
    """--sample: a share, decided document by document; --sample-per-group: a scan of the whole
    input first, for every group's documents (the sampled ones and the population)."""
    from .data.sampling import per_group_plan, share_plan

    if config.sample is not None:
        return share_plan(config.sample, config.seed)
    if "-" in config.data:
        raise PplError("--sample-per-group reads the input twice (a scan, then the sample), which standard input cannot do; use a file")
    scan = DocumentStream(sources, config, texts=texts)
    scan.check()
    return per_group_plan(((index, doc.group) for index, doc in scan), config.sample_per_group, config.seed)


def resumable(error: PplError, run_dir: RunDirectory) -> str:
    """A write error's or an engine's failure's message, with what is kept and how to go on."""
    if run_dir.spool:
        return str(error)
    if isinstance(error, WriteError):
        return f"{error}; the documents finished so far are kept in {run_dir.path}: make room and run the same command to resume"
    if error.exit_code in (EXIT_MODEL, EXIT_SERVER):
        return f"{error}; the documents finished so far are kept in {run_dir.path}: run the same command to resume"
    return str(error)


def joined_convention(config: Config) -> bool:
    return config.convention in JOINED_CONVENTIONS


def handed_on(rows: Iterable[dict], on_rows: Callable[[list[dict]], None], batch: int = 256) -> Iterator[dict]:
    """Pass rows through, handing them to on_rows a batch at a time (torchrun: as rank 0 joins the ranks' files)."""
    pending = []
    for row in rows:
        pending.append(row)
        if len(pending) == batch:
            on_rows(pending)
            pending = []
        yield row
    if pending:
        on_rows(pending)


def check_something_scored(summary: dict, config: Config, windowing) -> None:
    """A whole run with nothing to score is an error, as an empty file is; one shard of a corpus may
    get only empty documents and still be merged."""
    if summary["documents"] or config.shard:
        return
    curve = summary.get("length_curve") or {}
    bar = windowing.needed_tokens
    short, longest = curve.get("too_short_documents", 0), curve.get("longest_too_short", 0)
    raise PplError(nothing_scored(", ".join(config.data), summary["skipped_documents"], short, longest, windowing.lengths, bar), EXIT_DATA)


@dataclass(frozen=True)
class ConditionalRun:
    """A run whose documents are scored given a context: how they become sequences, and what run.json records of it."""

    sequences: Any  # engine.tokenizing.Conditional
    identity: dict


def conditional_sequences(config: Config, lm, windowing) -> ConditionalRun | None:
    """--context-field/--context-template, --messages-field or --chat-wrap: the layout of each
    document (the chat template rendered), the prefix tokens, and --ifd's prefix token."""
    from .engine.conventions import text_to_score, tokenizer_adds_bos
    from .engine.layouts import ChatRenderer, pair_layout
    from .engine.tokenizing import Conditional

    mode = config.conditional
    if mode is None:
        return None
    identity = {"mode": mode, "ifd": config.ifd}
    if mode == "pairs":
        layout = pair_layout
    else:
        renderer = ChatRenderer(lm.tokenizer, config)
        identity.update(chat_template=renderer.identity, score_roles=list(config.score_roles))
        if mode == "chat-wrap":
            identity["chat_prompt"] = config.chat_prompt
        layout = lambda doc: renderer.layout(doc, text_to_score(doc.text, windowing))  # noqa: E731
    lm_eval = windowing.convention == "lm-eval"
    if lm_eval:  # lm-eval encodes a pair with the tokenizer's own special tokens: BOS where it adds one
        pair_prefix = [lm.tokenizer.bos_token_id] if tokenizer_adds_bos(lm.tokenizer) else []
    else:
        pair_prefix = [windowing.bos_id] if windowing.add_bos else []
    empty_context_prefix = [windowing.prefix_id] if lm_eval else pair_prefix
    alone_prefix = None
    if config.ifd:
        alone_prefix = windowing.prefix_id if lm_eval else (windowing.bos_id if windowing.bos_id is not None else lm.bos_id)
        if alone_prefix is None:
            raise PplError("--ifd scores each continuation alone after a BOS token, and this tokenizer defines none")
    return ConditionalRun(Conditional(layout, mode, pair_prefix, empty_context_prefix, alone_prefix), identity)


@dataclass(frozen=True)
class WordRun:
    """--save-words: how words are scored, and what run.json and summary.json record of it."""

    export: Any  # output.word_export.WordExport
    classes: Any  # torch.Tensor [V, 3]: the word-start classes the engine sums (None: no correction)
    identity: dict
    described: dict


def word_export(config: Config, lm, windowing, run_dir: RunDirectory) -> WordRun | None:
    """--save-words: the tokenizer's word-start tokens (the correction on where they are defined,
    off with a one-line notice where not) and the word export into the run directory."""
    import torch

    from .engine.word_starts import find_word_starts
    from .output.word_export import WordExport

    if not config.save_words:
        return None
    found = find_word_starts(lm.tokenizer, lm.info["vocab_size"])
    if isinstance(found, str):
        if config.bow_correction:
            raise PplError(f"--bow-correction is not defined for {config.model}: {found}")
        if config.bow_correction is None:
            warnings.warn(f"words are scored without the beginning-of-word correction: {found}", PplWarning, stacklevel=2)
        found = None
    corrected = found is not None and config.bow_correction is not False
    classes = torch.from_numpy(found.classes()) if corrected else None
    export = WordExport(run_dir.path, found.starts if corrected else None, len(prefix(windowing)))
    described = {"on": corrected, **(found.describe() if found else {"why_off": "not defined for this tokenizer"})}
    if found is not None and not corrected:
        described["why_off"] = "--no-bow-correction"
    return WordRun(export, classes, {"words_field": config.words_field, "bow_correction": corrected}, described)


def kept_token_values(config: Config, word_classes: bool = False) -> tuple[str, ...]:
    """The per-token values the engine hands back: the NLL (for contexts.jsonl), a reference's KL
    and delta p (reference.jsonl), for --save-tokens entropy and rank too, for --signals entropy and z,
    for --save-words with the correction (`word_classes`) the word-start classes."""
    keep = ["nll"]
    if config.reference_model:
        keep += ["kld", "delta_p"] + (["ref_nll"] if config.save_tokens else [])
    if config.save_tokens:
        keep += ["entropy", "rank"]
    if config.signals:
        keep += ["entropy", "z"]
    if word_classes:
        from .engine.base import CLASS_VALUES

        keep += CLASS_VALUES
    return tuple(dict.fromkeys(keep))


def token_writer(folder: Path, tokenizer):
    """--save-tokens: each group's documents -> one Parquet part."""
    from .output.token_export import TokenPieces, document_table, write_part

    pieces = TokenPieces(tokenizer)
    return lambda documents: write_part(folder, [document_table(item.index, positions, values, pieces, item) for item, positions, values in documents])


def open_run_directory(config: Config, ranks) -> tuple[RunDirectory, Any]:
    """The output directory, or without -o a temporary one for the rows (shared by the ranks of one node)."""
    if config.output:
        run_dir, status = None, None
        try:  # rank 0 locks and prepares it; the others learn whether it could
            run_dir = RunDirectory(config.output, config.overwrite, ranks.rank, ranks.world)
        except PplError as e:
            status = (str(e), e.exit_code)
        status = ranks.broadcast(status)
        if status:
            if run_dir is not None:
                run_dir.close()
            raise PplError(*status)
        return run_dir, None
    if ranks.world > 1 and os.environ.get("LOCAL_WORLD_SIZE", str(ranks.world)) != str(ranks.world):
        raise PplError("torchrun over several nodes needs -o DIR on a filesystem every node shares")
    spool = tempfile.TemporaryDirectory(prefix="ppl-eval-") if ranks.main else None
    path = ranks.broadcast(spool.name if spool else None)
    return RunDirectory(path, rank=ranks.rank, world=ranks.world, spool=True), spool


def begin_run(run_dir: RunDirectory, ranks, identity: dict) -> None:
    """Rank 0 checks the output directory against this run (saying in one line what an earlier run
    finished there); then every rank may read what is done."""
    status = None
    if ranks.main and not run_dir.spool:
        try:
            run_dir.begin(identity)
            done = run_dir.done_count()
            if done:
                logger.info("resuming: %s of an earlier run are done in %s", counted(done, "document"), run_dir.path)
            folders = [TOKENS_DIR] * identity["save_tokens"] + [WORDS_DIR] * bool(identity.get("words"))
            keep_only_done(run_dir.path, (row["index"] for row in run_dir.done_rows()), folders)  # parts of rows a kill cut off are written anew
        except PplError as e:
            status = (str(e), e.exit_code)
    status = ranks.broadcast(status)
    if status:
        raise PplError(*status)


def stopped(signum: int, documents: int, run_dir: RunDirectory) -> Stopped:
    import signal

    name = signal.Signals(signum).name
    if run_dir.spool:
        return Stopped(f"stopped by {name}: {counted(documents, 'document')} scored but not saved (use -o DIR to keep them)", 128 + signum)
    saved = "1 document is" if documents == 1 else f"{documents:,} documents are"
    return Stopped(f"stopped by {name}: {saved} saved in {run_dir.path}; run the same command to resume", 128 + signum)


def default_batch_tokens(device, window: int) -> int:
    """Tokens per batch. On CPU one full window (larger batches measured slower: the matmuls are
    already compute-bound and bigger activations fall out of cache); on GPU many (OOM halves it)."""
    return max(window, 65536) if device.type == "cuda" else window
