"""evaluate(config): documents -> token windows -> scorer -> per-document results -> metrics -> reports."""

from __future__ import annotations

import platform
import signal
import sys
import threading
import time
from contextlib import contextmanager
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata

import numpy as np

from .config import Config
from .documents import Document, load_documents
from .errors import PplError
from .conventions import (
    Windowing,
    convention_summary,
    count_words,
    first_token_replacement,
    prefix,
    prepare,
    text_to_score,
    windows,
)
from .errors import EXIT_DATA
from .metrics import corpus_metrics, count_bytes, unit_metrics
from .reports import RunDirectory
from .sharding import parse_shard, select

MAX_DEFAULT_WINDOW = 2048
TOKENIZE_BATCH = 256  # documents per tokenizer call
GROUP_BATCHES = 8  # a group of documents fills about this many batches before its results are written


@dataclass
class Result:
    summary: dict  # what summary.json holds
    documents: list[dict]  # what documents.jsonl holds, in input order


def evaluate(config: Config, progress: bool = False, stdin=None) -> Result:
    """Score every document of config.data with config.model; write reports if config.output is set.

    Under torchrun each rank scores a token-balanced share and rank 0 writes the reports; every
    rank returns the same Result.
    """
    from . import distributed

    ranks = distributed.start()
    try:
        return evaluate_ranks(config, ranks, progress, stdin)
    finally:
        distributed.stop(ranks)


def evaluate_ranks(config: Config, ranks, progress: bool, stdin) -> Result:
    import torch

    from .model import load_model
    from .scorer import Scorer

    started = time.perf_counter()
    if ranks.world > 1 and config.data == "-":
        raise PplError("--data - (standard input) cannot be shared between torchrun ranks; use a file")
    run_dir = RunDirectory(config.output, config.overwrite, ranks.rank, ranks.world) if config.output else None
    docs, data_info = load_documents(config, stdin)
    if config.threads:
        torch.set_num_threads(config.threads)
    lm = load_model(config, ranks.local_rank)
    windowing = resolve_windowing(config, lm)
    docs = prepare(docs, windowing)
    token_ids = tokenize(lm.tokenizer, docs, windowing)
    # Scored tokens per document; 0 for the skipped: empty, whitespace-only or (no BOS) one token.
    sizes = [scored_tokens(doc, ids, windowing) for doc, ids in zip(docs, token_ids)]
    if windowing.convention == "llama-cpp" and len(token_ids[0]) < 2 * windowing.window:
        raise PplError(
            f"the llama-cpp convention needs at least 2 x window = {2 * windowing.window} tokens, as"
            f" llama-perplexity does; the text has {len(token_ids[0])}",
            EXIT_DATA,
        )
    shard = list(range(len(docs)))
    if config.shard:
        shard = select(shard, sizes, *parse_shard(config.shard))
        data_info["shard"] = config.shard
    mine = select(shard, sizes, ranks.rank, ranks.world) if ranks.world > 1 else shard
    done = begin_run(run_dir, ranks, config, lm.info, data_info, windowing) if run_dir else {}

    scorer = Scorer(lm.model, lm.device, config.max_batch_tokens or default_batch_tokens(lm.device, windowing.window))
    scoring_started = time.perf_counter()
    mine_kept = [i for i in mine if sizes[i]]
    results, scored_now = score_corpus(
        scorer, docs, token_ids, sizes, mine_kept, done, windowing, run_dir, progress and ranks.main
    )
    scoring_time = time.perf_counter() - scoring_started

    gathered = ranks.gather((results, scored_now))
    result = None
    if ranks.main:
        results = {i: row for part, _ in gathered for i, row in part.items()}
        scored_now = sum(n for _, n in gathered)
        kept = [i for i in shard if sizes[i]]
        documents = [results[i] for i in kept]
        wall = time.perf_counter() - started
        summary = build_summary(
            config, documents, len(shard) - len(kept), lm.info, data_info, windowing, wall, scored_now, scoring_time
        )
        summary["ranks"] = ranks.world
        if run_dir:
            run_dir.finish(summary, documents)
        result = Result(summary, documents)
    return ranks.broadcast(result)


def begin_run(run_dir, ranks, config, model_info, data_info, windowing) -> dict[int, dict]:
    """Rank 0 checks the output directory against this run; every rank learns what is done."""
    identity = {
        "model": config.model,
        "revision": config.revision,
        "dtype": model_info["dtype"],
        "data": data_info["fingerprint"],
        "shard": config.shard,
        "convention": windowing.convention,
        "detokenize": windowing.detokenize,
        "window": windowing.window,
        "stride": windowing.stride,
        "add_bos": windowing.add_bos,
    }
    status = None
    if ranks.main:
        try:
            status = ("done", run_dir.begin(identity))
        except PplError as e:
            status = ("error", str(e), e.exit_code)
    status = ranks.broadcast(status)
    if status[0] == "error":
        raise PplError(status[1], status[2])
    return status[1]


def score_corpus(scorer, docs, token_ids, sizes, kept, done, windowing, run_dir, progress) -> tuple[dict[int, dict], int]:
    """Score the kept documents not yet done, a group at a time, appending each group's results.

    SIGINT/SIGTERM stop the run after the current batch: finished groups are already on disk.
    """
    bar = progress_bar(sum(sizes[i] for i in kept), progress)
    bar.update(sum(sizes[i] for i in kept if i in done))
    results, scored_now = dict(done), 0
    with stop_signals() as stop:

        def on_tokens(n):
            bar.update(n)
            if stop.signum is not None:
                raise Interrupted(stop.signum)

        try:
            for group in document_groups(kept, token_ids, scorer.max_batch_tokens * GROUP_BATCHES):
                if all(i in done for i in group):
                    continue  # finished by an earlier run; skipping whole groups keeps the batch plan identical
                scores = score_documents(scorer, [token_ids[i] for i in group], windowing, on_tokens)
                scored_now += sum(sizes[i] for i in group)
                fresh = [document_result(i, docs[i], scored, windowing) for i, scored in zip(group, scores)]
                fresh = [row for row in fresh if row["index"] not in done]
                results.update((row["index"], row) for row in fresh)
                if run_dir:
                    run_dir.append(fresh)
        except Interrupted as e:
            bar.close()
            name = signal.Signals(e.signum).name
            saved = f"{len(results)} of {len(kept)} documents are saved in {run_dir.path}; run the same command to resume"
            unsaved = f"{len(results)} of {len(kept)} documents were scored but not saved (use -o DIR to keep them)"
            raise PplError(f"stopped by {name}: " + (saved if run_dir else unsaved), 128 + e.signum) from None
    bar.close()
    return results, scored_now


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopRequest:
    signum: int | None = None


@contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """SIGINT/SIGTERM ask the run to stop after the current batch; a second one stops it at once."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be set from the main thread
        return

    def handler(signum, frame):
        if stop.signum is not None:
            raise KeyboardInterrupt
        stop.signum = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def resolve_windowing(config: Config, lm) -> Windowing:
    convention = config.convention
    window = config.window or min(lm.context_length or MAX_DEFAULT_WINDOW, MAX_DEFAULT_WINDOW)
    if lm.context_length and window > lm.context_length:
        raise PplError(f"--window {window} is larger than the model's context length ({lm.context_length})")
    stride = config.stride or max(1, window // 2)
    if convention in ("hf-recipe", "lm-eval") and config.add_bos is not None:
        rule = "never adds special tokens" if convention == "hf-recipe" else "always prefixes its prefix token"
        raise PplError(f"--add-bos/--no-add-bos do not apply to --convention {convention}: it {rule}")
    if convention == "sliding":
        add_bos = config.add_bos if config.add_bos is not None else lm.bos_id is not None
    elif convention == "llama-cpp":  # llama.cpp adds BOS when the model's tokenizer does by default
        add_bos = config.add_bos if config.add_bos is not None else tokenizer_adds_bos(lm.tokenizer)
    else:
        add_bos = False
    if add_bos and lm.bos_id is None:
        raise PplError("--add-bos: this tokenizer defines no BOS or end-of-text token")
    prefix_id = None
    if convention == "lm-eval":  # lm-eval's prefix_token_id: BOS, else EOS
        tok = lm.tokenizer
        prefix_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if prefix_id is None:
            raise PplError("--convention lm-eval: this tokenizer has neither a BOS nor an EOS token to prefix")
    bos_id = lm.bos_id if add_bos else None
    return Windowing(convention, window, stride, add_bos, bos_id, prefix_id, config.detokenize)


def tokenizer_adds_bos(tokenizer) -> bool:
    ids = tokenizer("a").input_ids
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def scored_tokens(doc: Document, ids, windowing: Windowing) -> int:
    if not doc.text.strip():
        return 0
    return sum(w.end - w.score_from for w in windows(len(ids), windowing))


def default_batch_tokens(device, window: int) -> int:
    """Tokens per batch. On CPU one full window (larger batches measured slower: the matmuls are
    already compute-bound and bigger activations fall out of cache); on GPU many (OOM halves it)."""
    return max(window, 65536) if device.type == "cuda" else window


def tokenize(tokenizer, docs: list[Document], windowing: Windowing) -> list[np.ndarray]:
    """Each document on its own, without the tokenizer's special tokens, the convention's prefix first.

    Ids are kept as int32 arrays (4 bytes a token, not a Python int's 28+8) so a large corpus fits.
    """
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # silence "sequence longer than the model's maximum"
    try:
        ids = []
        for start in range(0, len(docs), TOKENIZE_BATCH):
            texts = [text_to_score(doc.text, windowing) for doc in docs[start : start + TOKENIZE_BATCH]]
            encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
            ids += [np.array(prefix(windowing) + doc_ids, dtype=np.int32) for doc_ids in encoded]
    finally:
        transformers.logging.set_verbosity(verbosity)
    return ids


def document_groups(indices: list[int], token_ids: list[np.ndarray], budget: int) -> Iterator[list[int]]:
    """Consecutive documents of about `budget` tokens: their windows are batched together."""
    group, size = [], 0
    for i in indices:
        group.append(i)
        size += len(token_ids[i])
        if size >= budget:
            yield group
            group, size = [], 0
    if group:
        yield group


def score_documents(scorer, sequences: Sequence, windowing: Windowing, on_tokens) -> list[list[tuple]]:
    """For each token sequence, its windows with their NLL sum and sum of squares, in order."""
    import torch

    from .scorer import Job

    replacement = first_token_replacement(windowing)
    jobs, owners = [], []
    for d, ids in enumerate(sequences):
        tokens = torch.as_tensor(ids, dtype=torch.long)  # [n]
        for w in windows(len(ids), windowing):
            span = tokens[w.begin : w.end]
            if replacement is not None:
                span = span.clone()
                span[0] = replacement
            # Read the whole span when it fits the window (the recipe's shape); lm-eval's spans are
            # window + 1 tokens, of which the model reads the first `window`, as lm-eval does.
            jobs.append(Job(span, w.score_from - w.begin, min(len(span), windowing.window)))
            owners.append((d, w))
    scored: list[list[tuple]] = [[] for _ in sequences]
    for (d, w), (nll, nll_sq) in zip(owners, scorer.score(jobs, on_tokens)):
        scored[d].append((w, nll, nll_sq))
    return scored


def document_result(index: int, doc: Document, scored: list[tuple], windowing: Windowing) -> dict:
    """A document's metrics; word and byte counts always come from the original text."""
    nll = sum(s for _, s, _ in scored)
    tokens = sum(w.end - w.score_from for w, _, _ in scored)
    words = count_words(doc.text, windowing)
    row = {"index": index, "id": doc.id, **unit_metrics(nll, tokens, words, count_bytes(doc.text))}
    if windowing.convention == "hf-recipe":
        row.update(published_normalisation(scored))
    if windowing.convention == "llama-cpp":
        row["nll_sq_sum"] = sum(sq for _, _, sq in scored)
    return row


def published_normalisation(scored: list[tuple]) -> dict:
    """The guide's sum: each window's mean loss times (valid labels - 1), valid labels counted
    before the model's internal shift, so every window after the first loses one token."""
    nll, tokens, prev_end = 0.0, 0, 0
    for w, window_nll, _ in scored:
        valid = min(w.end - prev_end, w.end - w.begin)
        nll += window_nll / (w.end - w.score_from) * (valid - 1)
        tokens += valid - 1
        prev_end = w.end
    return {"published_nll_sum": nll, "published_tokens": tokens}


def build_summary(config, documents, skipped, model_info, data_info, windowing, wall, scored_now, scoring_time) -> dict:
    metrics = corpus_metrics(documents, config.bootstrap_samples, config.seed)
    return {
        **metrics,
        "documents": len(documents),
        "skipped_documents": skipped,
        "windowing": windowing.describe(),
        **convention_summary(documents, windowing.convention),
        "model": model_info,
        "data": data_info,
        "config": config.to_dict(),
        "versions": versions(),
        "wall_time_s": wall,  # everything: loading data and model, tokenizing, scoring, writing
        "scoring_time_s": scoring_time,
        # Scored tokens per second of scoring time, counting only what this process scored (not a resume's earlier part).
        "tokens_per_second": scored_now / scoring_time if scored_now else None,
    }


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("ppl-eval", "torch", "transformers", "tokenizers", "datasets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, unit="tok", unit_scale=True, desc="scoring", disable=not enabled, file=sys.stderr, smoothing=0.1
    )
