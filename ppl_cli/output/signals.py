"""--signals: what a document's scored tokens say beyond its perplexity. Pure functions.

Each signal is over the document's scored tokens (a document given a context: its continuation or
scored turns), every token's values coming from the one window that scores it, so a document of
any length has them; the reference scripts cut a text at one window instead. Natural logs.

- min_k: Min-K% Prob (Shi et al. 2024): the mean log p of the int(k n) least likely of the n
  scored tokens (at least one). Higher: more likely seen in training. detect-pretrain-code and
  MIMIR report its negation; mink-plus-plus reports it as here.
- min_k_plus_plus: Min-K%++ (Zhang et al. 2024): the same mean over z = (log p - mu) / sigma, with
  mu and sigma^2 the mean and variance of log p(v) under the model's predicted distribution at that
  position (the scorer's `z`). Higher: more likely seen.
- zlib_ratio: the mean NLL per token (ln perplexity) over the size in bytes of the scored text
  compressed by zlib (level 6): Carlini et al. 2021's code, detect-pretrain-code and MIMIR. Lower:
  the model finds the text more predictable than its zlib entropy suggests.
- mean_entropy: the mean entropy of the model's predicted distribution, -sum_v p(v) log p(v), in
  nats: how uncertain the model is, where perplexity is how surprised.
- reference_ratio (with --reference-model): the document's ln perplexity under the model over that
  under the reference, nll_sum / ref_nll_sum (Carlini et al.'s comparison with a second model).
  Lower: the model knows the text better than the reference does.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

SIGNALS = ("min_k", "min_k_plus_plus", "zlib_ratio", "mean_entropy", "reference_ratio")
HIGHER_MEANS_SEEN = {"min_k": True, "min_k_plus_plus": True, "zlib_ratio": False, "mean_entropy": False, "reference_ratio": False}


def lowest_mean(values: np.ndarray, k: float) -> float:
    """The mean of the int(k n) smallest of n values, as the reference code takes them (at least one)."""
    m = max(1, int(len(values) * k))
    return float(np.partition(values, m - 1)[:m].astype(np.float64).mean())


def zlib_size(texts: Sequence[str]) -> int:
    """Bytes of the texts' UTF-8, joined, once compressed by zlib at its default level (6)."""
    return len(zlib.compress("".join(texts).encode("utf-8")))


def document_signals(tokens: dict[str, np.ndarray], texts: Sequence[str], k: float, row: dict) -> dict:
    """A document's signals from its scored tokens' values (`nll`, `entropy`, `z`, in order), the
    texts scored of it and its row (nll_sum, tokens, and ref_nll_sum with a reference model).
    Without `z` and `entropy` (an engine that returns no distribution) those two signals are None."""
    out = {
        "min_k": lowest_mean(-tokens["nll"], k),
        "min_k_plus_plus": lowest_mean(tokens["z"], k) if "z" in tokens else None,
        "zlib_ratio": row["nll_sum"] / row["tokens"] / zlib_size(texts),
        "mean_entropy": float(tokens["entropy"].astype(np.float64).mean()) if "entropy" in tokens else None,
    }
    if "ref_nll_sum" in row:
        out["reference_ratio"] = row["nll_sum"] / row["ref_nll_sum"] if row["ref_nll_sum"] > 0 else None
    return out

