"""The seam between ppl-eval's windows and whatever computes log-probabilities: one small interface.

An engine gets jobs (a window's token ids, how many of them are context, how many the model reads)
and gives back, for each, the sums of its scored tokens' negative log-probabilities (float64) and,
where asked, each scored token's values in order. Everything else (which windows, which documents,
rows, resume, the commands over finished runs) belongs to the caller, so every engine gives the same
rows. One file per engine:

- transformers_engine.py: a transformers model in this process (batched forward passes, the LM head chunked)
- vllm_engine.py: vLLM in this process (its worker processes, tensor and pipeline parallel, Ray)
- served_engine.py: a model behind an OpenAI-compatible server (vLLM's, SGLang's), many requests in flight
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from ..errors import PplError

class Job(NamedTuple):
    """One window to score: its tokens, of which tokens[context:] are scored.

    The model reads tokens[:reads]: at least all but the last (a target only). Reading the last
    one too, as the HF recipe does, changes no score but keeps the pass the recipe's exact shape,
    so float32 kernels round the same way.
    """

    tokens: Any  # [m] int64 torch tensor, the window span t[begin:end]
    context: int  # score_from - begin, at least 1
    reads: int  # m - 1 or m
    tail: bool = False  # also the distribution after the last token (reads == m): its word-start classes

    @property
    def scored(self) -> int:
        return len(self.tokens) - self.context


class Scored(NamedTuple):
    """One job's sums over its scored tokens (float64, keys as in documents.jsonl) and, when the
    engine keeps them, its per-token values in order (numpy, keys as in TOKEN_VALUES); for a job
    with `tail`, the word-start classes' log-probabilities after its last token."""

    sums: dict[str, float]
    tokens: dict[str, np.ndarray] | None = None
    tail: dict[str, float] | None = None


# Per-token values an engine may keep: the NLL always; with a reference model P the NLL under P,
# KL(P || Q) over the whole vocabulary, whether both models' most likely tokens agree, and
# delta_p = q(token) - p(token); for --save-tokens and --signals the entropy of Q's distribution and
# the token's rank in it (1 = most likely); for --signals the token's log q standardised over Q's
# distribution, z = (log q - mu) / sigma; for --save-words the log-probability of each word-start
# class of the token's distribution (word_starts.py): a word start, a word start or EOS, neither.
TOKEN_VALUES = ("nll", "ref_nll", "kld", "same_top", "delta_p", "entropy", "rank", "z", "bow", "bow_eos", "not_bow")
CLASS_VALUES = ("bow", "bow_eos", "not_bow")  # the columns of the word classes matrix, in order
WHOLE_DISTRIBUTION = {  # per-token values that need every token's probability at a position, by what asks for them
    "entropy": "the entropy (--save-tokens' column, --signals' mean_entropy)",
    "z": "--signals' min_k_plus_plus",
    "kld": "--reference-model",
    "bow": "--save-words' beginning-of-word correction",
}


class WindowError(PplError):
    """What went wrong with one job (its index in the jobs given to stream()), for the caller to
    name its document and window."""

    def __init__(self, job: int, message: str, exit_code: int):
        super().__init__(message, exit_code)
        self.job = job


class Engine:
    """Jobs -> Scored, a batch at a time. `keeps`: the per-token values it can give (TOKEN_VALUES);
    `max_batch_tokens`: tokens of one batch, which sizes the groups of documents in flight."""

    name = ""
    keeps: frozenset[str] = frozenset({"nll"})
    max_batch_tokens: int = 1
    dtype = "float32"  # the precision it computes in, as torch names it
    fresh_positions = False  # each pass scaled for its own length (set where the logits depend on it)
    reference = None  # a reference model's engine, scored on the same windows (transformers only)

    def plan(self, jobs: Sequence[Job]) -> list[list[int]]:
        """The batches of job indices these jobs are scored in."""
        return plan_batches([job.reads for job in jobs], self.max_batch_tokens)

    def score_batch(self, jobs: list[Job], stop=None) -> list[Scored]:
        """Score one batch. `stop`: its check() raises where the user asked the run to stop,
        called as often as the engine can (between layers, requests, steps)."""
        raise NotImplementedError

    def stream(self, jobs: Sequence[Job], batches: list[list[int]], stop=None) -> Iterator[tuple[list[int], list[Scored]]]:
        """Each batch with its results as soon as it is done (in any order: an engine may keep
        several in flight)."""
        for batch in batches:
            yield batch, self.score_batch([jobs[i] for i in batch], stop)

    def score(self, jobs: Sequence[Job], on_tokens: Callable[[int], None] | None = None) -> list[Scored]:
        """Every job's result, in order (benchmarks and tests; runs go through stream)."""
        totals: list[Scored] = [Scored({})] * len(jobs)
        for batch, results in self.stream(jobs, self.plan(jobs)):
            for index, scored in zip(batch, results):
                totals[index] = scored
            if on_tokens:
                on_tokens(sum(jobs[i].scored for i in batch))
        return totals

    def length_dependence(self, shortest: int, longest: int) -> str | None:
        """Why one pass over `longest` tokens would not give the first `shortest` tokens' numbers
        (None: it does): the same probe ids scored at both lengths, their shared tokens compared."""
        position = np.arange(longest)
        ids = (position * 7919 + position * position * 31) % self.vocab_size()  # not periodic
        import torch

        tokens = torch.as_tensor(ids, dtype=torch.long)
        long, short = self.score([Job(tokens, 1, longest), Job(tokens[:shortest], 1, shortest)])
        if long.tokens is None or short.tokens is None:
            return None
        difference = float(np.abs(long.tokens["nll"][: shortest - 1] - short.tokens["nll"]).max())
        if difference <= PROBE_TOLERANCE.get(self.dtype, HALF_PROBE_TOLERANCE):
            return None
        return f"a probe's first {shortest} tokens' log-probabilities differ by up to {difference:.2g} nats between inputs of {shortest} and {longest} tokens"

    def vocab_size(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Give back what the engine holds (worker processes, memory)."""



class RequestEngine(Engine):
    """An engine that batches the requests itself (vLLM, a server): the jobs go in the order given
    (documents in input order), about max_batch_tokens a batch, a batch being only how often
    finished windows come back; subclasses define stream()."""

    max_batch_tokens: int

    def plan(self, jobs: Sequence[Job]) -> list[list[int]]:
        batches: list[list[int]] = []
        size = 0
        for i, job in enumerate(jobs):
            if not batches or size + job.reads > self.max_batch_tokens:
                batches.append([])
                size = 0
            batches[-1].append(i)
            size += job.reads
        return batches

    def score_batch(self, jobs: list[Job], stop=None) -> list[Scored]:
        [(_, results)] = list(self.stream(jobs, [list(range(len(jobs)))], stop))
        return results


PROBE_TOLERANCE = {"float32": 1e-3}  # nats: rounding moves a token's log-probability far less between two input lengths
HALF_PROBE_TOLERANCE = 0.25  # bfloat16, float16, quantized: a length-dependent position scaling moves them by nats


def window_sums(nll: np.ndarray) -> dict[str, float]:
    """A window's sums from its scored tokens' NLL (float32 or float64), accumulated in float64."""
    values = nll.astype(np.float64)
    return {"nll_sum": float(values.sum()), "nll_sq_sum": float((values * values).sum())}


def plan_batches(lengths: Sequence[int], max_batch_tokens: int, max_rows: int | None = None, same_length: bool = False) -> list[list[int]]:
    """Group job indices, longest first, so that rows * longest length <= max_batch_tokens (and
    rows <= max_rows; with `same_length`, no padding: jobs of one length a batch).

    Sorting by length keeps padding small; a job longer than the budget gets a batch of its own.
    The plan depends only on the lengths, so it is the same on every run.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        fits = batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_batch_tokens and len(batches[-1]) != max_rows
        if fits and (not same_length or lengths[i] == lengths[batches[-1][0]]):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches
