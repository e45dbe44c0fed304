"""Per-document and corpus metrics from NLL sums and unit counts. Pure functions.

Every perplexity here is exp(total NLL in nats / total units), with the units being scored
tokens, whitespace-separated words or UTF-8 bytes of the original text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LN2 = math.log(2.0)
METRIC_KEYS = (
    "nll_sum",
    "tokens",
    "token_perplexity",
    "words",
    "word_perplexity",
    "bytes",
    "byte_perplexity",
    "bits_per_byte",
)


def count_words(text: str) -> int:
    return len(text.split())


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def perplexity(nll_sum: float, units: int) -> float | None:
    """exp(nll_sum / units); None when there are no units, never a division by zero.

    Returns inf (not an OverflowError) for a mean NLL beyond ~709 nats.
    """
    if units <= 0:
        return None
    mean = nll_sum / units
    return math.exp(mean) if mean < 709.0 else math.inf


def unit_metrics(nll_sum: float, tokens: int, words: int, n_bytes: int) -> dict:
    """The metric block shared by a document and the corpus, keys in METRIC_KEYS order."""
    return {
        "nll_sum": nll_sum,
        "tokens": tokens,
        "token_perplexity": perplexity(nll_sum, tokens),
        "words": words,
        "word_perplexity": perplexity(nll_sum, words),
        "bytes": n_bytes,
        "byte_perplexity": perplexity(nll_sum, n_bytes),
        "bits_per_byte": nll_sum / (n_bytes * LN2) if n_bytes > 0 else None,
    }


def corpus_metrics(docs: Sequence[dict], bootstrap_samples: int = 1000, seed: int = 0) -> dict:
    """Sums over documents (a micro average), the macro mean and a bootstrap interval."""
    nll = np.array([d["nll_sum"] for d in docs], dtype=np.float64)
    tokens = np.array([d["tokens"] for d in docs], dtype=np.int64)
    n_bytes = np.array([d["bytes"] for d in docs], dtype=np.int64)
    words = sum(d["words"] for d in docs)
    out = unit_metrics(float(nll.sum()), int(tokens.sum()), int(words), int(n_bytes.sum()))
    doc_ppl = [d["token_perplexity"] for d in docs if d["token_perplexity"] is not None]
    out["macro_token_perplexity"] = float(np.mean(doc_ppl)) if doc_ppl else None
    out["bootstrap"] = bootstrap_interval(nll, tokens, n_bytes, bootstrap_samples, seed)
    return out


def bootstrap_interval(
    nll: np.ndarray, tokens: np.ndarray, n_bytes: np.ndarray, samples: int, seed: int, confidence: float = 0.95
) -> dict | None:
    """Percentile bootstrap over documents for corpus token perplexity and bits per byte.

    Each sample draws len(nll) documents with replacement (numpy PCG64 seeded with `seed`)
    and recomputes the ratio of sums; the interval is the (2.5, 97.5) percentiles.
    """
    n = len(nll)
    if samples <= 0 or n == 0:
        return None
    rng = np.random.default_rng(seed)
    ppl, bpb = [], []
    rows = max(1, 4_000_000 // n)  # bound the [rows, n] index matrix to ~32 MB
    for start in range(0, samples, rows):
        idx = rng.integers(0, n, size=(min(rows, samples - start), n))
        s_nll, s_tok, s_bytes = nll[idx].sum(1), tokens[idx].sum(1), n_bytes[idx].sum(1)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ppl.append(np.exp(s_nll / s_tok))
            bpb.append(s_nll / (s_bytes * LN2))
    tail = (1 - confidence) / 2 * 100

    def interval(values):
        values = np.concatenate(values)
        values = values[np.isfinite(values)]
        if len(values) == 0:
            return None
        return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]

    return {
        "confidence": confidence,
        "samples": samples,
        "seed": seed,
        "token_perplexity": interval(ppl),
        "bits_per_byte": interval(bpb),
    }
