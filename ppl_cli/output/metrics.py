"""Per-document and corpus metrics from NLL sums and unit counts. Pure functions.

Every perplexity here is exp(total NLL in nats / total units), with the units being scored
tokens, whitespace-separated words or UTF-8 bytes of the original text.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Sequence

import numpy as np

from .signals import SIGNALS

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


def count_words(text: str, convention: str = "sliding") -> int:
    """Whitespace-separated words; lm-eval counts len(re.split(r"\\s+", text)), which also counts
    the empty strings before leading and after trailing whitespace."""
    if convention == "lm-eval":
        return len(re.split(r"\s+", text))
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


ROW_KEYS = {"index", "id", "group", *METRIC_KEYS, *SIGNALS, "word_perplexity_corrected"}  # every other number in a row is a per-document sum (conventions', the reference model's, the words')
BOOTSTRAP_ELEMENTS = 1 << 21  # samples x documents drawn at a time: bounds the bootstrap's memory


def corpus_metrics(docs: Iterable[dict], bootstrap_samples: int = 1000, seed: int = 0) -> dict:
    """Sums over documents (a micro average), the macro mean and a bootstrap interval."""
    return accumulate(docs, bootstrap_samples, seed).metrics()


def accumulate(docs: Iterable[dict], bootstrap_samples: int, seed: int, grouped: bool = False) -> CorpusTotals:
    """One pass over the document rows in index order, holding one chunk of them at a time;
    `grouped`: also per group (the rows' `group`), with the same resampling weights."""
    totals = CorpusTotals(bootstrap_samples, seed, grouped)
    chunk: list[dict] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == totals.chunk:
            totals.add(chunk)
            chunk = []
    if chunk:
        totals.add(chunk)
    return totals


class Totals:
    """Sums over a set of documents, and over each bootstrap resample of them given the weights."""

    def __init__(self, samples: int):
        self.samples = samples
        self.documents = 0
        self.nll = 0.0
        self.tokens = self.words = self.bytes = 0
        self.macro_sum, self.macro_count = 0.0, 0
        self.resampled = np.zeros((samples, 3))  # per sample: weighted nll, tokens, bytes
        self.signals = SignalTotals(samples)
        self.lengths: LengthTotals | None = None  # --lengths: made with the first row that has them

    def add(self, docs: Sequence[dict], values: np.ndarray, weights: np.ndarray | None) -> None:
        """`values` [m, 3]: each document's nll, tokens, bytes; `weights` [B, m]: its resampling weights."""
        self.documents += len(docs)
        self.nll += float(values[:, 0].sum())
        self.tokens += sum(d["tokens"] for d in docs)
        self.bytes += sum(d["bytes"] for d in docs)
        self.words += sum(d["words"] for d in docs)
        for d in docs:
            if d["token_perplexity"] is not None:
                self.macro_sum += d["token_perplexity"]
                self.macro_count += 1
        if weights is not None:
            self.resampled += weights @ values  # [B, m] @ [m, 3]
        self.signals.add(docs, weights)
        if "lengths" in docs[0]:
            if self.lengths is None:
                self.lengths = LengthTotals(len(docs[0]["lengths"]["nll"]), self.samples)
            self.lengths.add(docs, weights)

    def metrics(self, seed: int) -> dict:
        out = unit_metrics(self.nll, self.tokens, self.words, self.bytes)
        out["macro_token_perplexity"] = self.macro_sum / self.macro_count if self.macro_count else None
        out["bootstrap"] = self.interval(seed) if self.samples and self.documents else None
        signals = self.signals.summary()
        if signals is not None:
            out["signals"] = signals
        if self.lengths is not None:
            out["length_points"] = self.lengths.points(seed)
        return out

    def interval(self, seed: int, confidence: float = 0.95) -> dict:
        """Percentile interval of the resampled token perplexity and bits per byte, over how many
        documents; none from one document (a resample holds it or nothing: no spread to measure)."""
        nll, tokens, n_bytes = self.resampled.T
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ppl = np.exp(nll / tokens)
            bpb = nll / (n_bytes * LN2)
        out = {"confidence": confidence, "samples": self.samples, "seed": seed, "method": "poisson", "documents": self.documents}
        if self.documents < 2:
            return {**out, "token_perplexity": None, "bits_per_byte": None, "missing": ONE_DOCUMENT}
        return {**out, "token_perplexity": percentile_interval(ppl, confidence), "bits_per_byte": percentile_interval(bpb, confidence)}


ONE_DOCUMENT = "one document"  # why an interval is missing: a resample of one document holds it or nothing


def percentile_interval(values: np.ndarray, confidence: float = 0.95) -> list[float] | None:
    """The central `confidence` interval of the finite values (a resample with no units has none)."""
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return None
    tail = (1 - confidence) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


class SignalTotals:
    """Each signal's mean over documents, its range, and the mean in every bootstrap resample (the
    documents' Poisson weights: a resample's mean is sum w s / sum w over the documents that have it)."""

    def __init__(self, samples: int):
        self.samples = samples
        self.count = np.zeros(len(SIGNALS))
        self.total = np.zeros(len(SIGNALS))
        self.low = np.full(len(SIGNALS), np.inf)
        self.high = np.full(len(SIGNALS), -np.inf)
        self.resampled = np.zeros((samples, len(SIGNALS)))  # sum of w s
        self.resampled_weight = np.zeros((samples, len(SIGNALS)))  # sum of w

    def add(self, docs: Sequence[dict], weights: np.ndarray | None) -> None:
        """`weights` [B, m]: the documents' resampling weights (None: no bootstrap)."""
        if "min_k" not in docs[0]:  # a run without --signals
            return
        values = np.array([[np.nan if d.get(s) is None else d[s] for s in SIGNALS] for d in docs], dtype=np.float64)  # [m, S]
        present = ~np.isnan(values)
        filled = np.where(present, values, 0.0)
        self.count += present.sum(0)
        self.total += filled.sum(0)
        self.low = np.minimum(self.low, np.where(present, values, np.inf).min(0))
        self.high = np.maximum(self.high, np.where(present, values, -np.inf).max(0))
        if weights is not None:
            self.resampled += weights @ filled  # [B, m] @ [m, S]
            self.resampled_weight += weights @ present

    def summary(self, confidence: float = 0.95) -> dict | None:
        """Per signal: documents, mean, min, max and the bootstrap's percentile interval of the mean."""
        if not self.count.any():
            return None
        out = {}
        for s, name in enumerate(SIGNALS):
            if not self.count[s]:
                continue
            interval = None
            if self.samples and self.count[s] > 1:  # none from one document
                drawn = self.resampled_weight[:, s] > 0
                interval = percentile_interval(self.resampled[drawn, s] / self.resampled_weight[drawn, s], confidence)
            out[name] = {
                "documents": int(self.count[s]),
                "mean": float(self.total[s] / self.count[s]),
                "min": float(self.low[s]),
                "max": float(self.high[s]),
                "bootstrap": interval,
            }
        return out


class LengthTotals:
    """--lengths: at each length, over the documents that reach it, the sums of their NLL, scored
    tokens and bytes, their number and the sum of their token perplexities; and the same in each
    bootstrap resample (the documents' Poisson weights)."""

    COLUMNS = ("nll", "tokens", "bytes", "documents", "perplexities")

    def __init__(self, lengths: int, samples: int):
        self.samples = samples
        self.sums = np.zeros((lengths, len(self.COLUMNS)))
        self.resampled = np.zeros((samples, lengths, len(self.COLUMNS)))

    def add(self, docs: Sequence[dict], weights: np.ndarray | None) -> None:
        """`weights` [B, m]: the documents' resampling weights (None: no bootstrap)."""
        values = np.zeros((len(docs), *self.sums.shape))  # [m, K, 5]
        for i, d in enumerate(docs):
            at = d["lengths"]
            for k, (nll, tokens, n_bytes) in enumerate(zip(at["nll"], at["tokens"], at["bytes"])):
                if nll is not None:
                    values[i, k] = (nll, tokens, n_bytes, 1.0, perplexity(nll, tokens) or 0.0)
        self.sums += values.sum(axis=0)
        if weights is not None:
            self.resampled += np.einsum("bm,mkc->bkc", weights, values)

    def points(self, seed: int, confidence: float = 0.95) -> list[dict]:
        """Per length (in order): documents, tokens, nll_sum, token_perplexity (micro),
        mean_document_perplexity (macro), bits_per_byte, and each one's percentile interval."""
        out = []
        for k, (nll, tokens, n_bytes, documents, perplexities) in enumerate(self.sums):
            point = {
                "documents": int(documents),
                "tokens": int(tokens),
                "nll_sum": float(nll),
                "token_perplexity": perplexity(nll, int(tokens)),
                "mean_document_perplexity": float(perplexities / documents) if documents else None,
                "bits_per_byte": float(nll / (n_bytes * LN2)) if n_bytes else None,
                "bootstrap": None,
            }
            if self.samples and documents:
                r = self.resampled[:, k, :].T  # [5, B]
                point["bootstrap"] = {"confidence": confidence, "samples": self.samples, "seed": seed, "method": "poisson", "documents": int(documents)}
                if documents < 2:
                    point["bootstrap"].update(token_perplexity=None, mean_document_perplexity=None, bits_per_byte=None, missing=ONE_DOCUMENT)
                    out.append(point)
                    continue
                with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # each statistic from its own resampled sums
                    point["bootstrap"].update(
                        token_perplexity=percentile_interval(np.exp(r[0] / r[1]), confidence),
                        mean_document_perplexity=percentile_interval(r[4] / r[3], confidence),
                        bits_per_byte=percentile_interval(r[0] / (r[2] * LN2), confidence),
                    )
            out.append(point)
        return out


class CorpusTotals(Totals):
    """What the corpus summary needs, accumulated a chunk of documents at a time: the corpus sums,
    every other number of the rows summed, and with `grouped` the sums of each group, resampled
    with the corpus's own Poisson weights (so a document weighs the same in its group and the corpus)."""

    def __init__(self, bootstrap_samples: int, seed: int, grouped: bool = False):
        super().__init__(bootstrap_samples)
        self.seed = seed
        self.chunk = max(1, BOOTSTRAP_ELEMENTS // max(bootstrap_samples, 1))
        self.rng = np.random.default_rng(seed)
        self.extras: dict[str, float] = {}  # every other number of the rows, summed
        self.extra_counts: dict[str, int] = {}  # and how many rows had it (not null)
        self.groups: dict[str, Totals] | None = {} if grouped else None

    def add(self, docs: Sequence[dict]) -> None:
        values = np.array([[d["nll_sum"], d["tokens"], d["bytes"]] for d in docs], dtype=np.float64)  # [m, 3]
        weights = poisson_weights(self.rng, (self.samples, len(docs))) if self.samples else None  # [B, m]
        super().add(docs, values, weights)
        for d in docs:
            for key, value in d.items():
                if key not in ROW_KEYS and isinstance(value, (int, float)):
                    self.extras[key] = self.extras.get(key, 0) + value
                    self.extra_counts[key] = self.extra_counts.get(key, 0) + 1
        if self.groups is not None:
            members: dict[str, list[int]] = {}
            for k, d in enumerate(docs):
                members.setdefault(d["group"], []).append(k)
            for name, ks in members.items():
                at = np.array(ks)
                group = self.groups.setdefault(name, Totals(self.samples))
                group.add([docs[k] for k in ks], values[at], weights[:, at] if weights is not None else None)

    def metrics(self) -> dict:
        return super().metrics(self.seed)

    def macro(self, confidence: float = 0.95) -> dict:
        """Paloma's macro average: the mean over groups of their token perplexity and of their bits
        per byte, with a percentile interval over the same resamples (in a resample, the mean over
        the groups that drew any token)."""
        groups = [g for g in (self.groups or {}).values() if g.tokens]
        out = {
            "groups": len(groups),
            "token_perplexity": float(np.mean([perplexity(g.nll, g.tokens) for g in groups])) if groups else None,
            "bits_per_byte": float(np.mean([g.nll / (g.bytes * LN2) for g in groups if g.bytes])) if groups else None,
            "bootstrap": None,
        }
        if self.samples and groups:
            resampled = np.stack([g.resampled for g in groups])  # [G, B, 3]
            nll, tokens, n_bytes = resampled[..., 0], resampled[..., 1], resampled[..., 2]
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a resample in which no group drew a token: NaN
                ppl = np.where(tokens > 0, np.exp(nll / tokens), np.nan)
                bpb = np.where(n_bytes > 0, nll / (n_bytes * LN2), np.nan)
                ppl_mean, bpb_mean = np.nanmean(ppl, axis=0), np.nanmean(bpb, axis=0)  # [B]
            out["bootstrap"] = {
                "confidence": confidence,
                "samples": self.samples,
                "seed": self.seed,
                "method": "poisson, the corpus's weights",
                "token_perplexity": percentile_interval(ppl_mean, confidence),
                "bits_per_byte": percentile_interval(bpb_mean, confidence),
            }
        return out


# P(X <= k) for X ~ Poisson(1), scaled to 32-bit integers: a uniform u in [0, 2^32) gives the draw
# k = #{j : u >= THRESHOLDS[j]} (inversion), exact to 2^-32 in probability.
POISSON_CDF = np.cumsum([math.exp(-1) / math.factorial(k) for k in range(20)])
THRESHOLDS = np.minimum(np.round(POISSON_CDF * 2**32), 2**32).astype(np.uint64)
# Most 16-bit prefixes of u settle the draw alone; the few that straddle a threshold are compared in full.
_HIGH = np.arange(1 << 16, dtype=np.uint64) << 16
HIGH_DRAW = np.searchsorted(THRESHOLDS, _HIGH, side="right").astype(np.uint8)
HIGH_STRADDLES = HIGH_DRAW != np.searchsorted(THRESHOLDS, _HIGH + 0xFFFF, side="right")


def poisson_weights(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Poisson(1) draws (how often each document is drawn in each resample), as float64.

    u = rng.integers(0, 2^32, shape, uint32), then k = searchsorted(THRESHOLDS, u, "right"),
    computed through a 16-bit table on u's high half (3x faster than numpy's own Poisson sampler).
    """
    u = rng.integers(0, 1 << 32, size=shape, dtype=np.uint32)
    high = u >> 16
    draws = HIGH_DRAW[high]
    straddles = HIGH_STRADDLES[high]
    if straddles.any():
        draws[straddles] = np.searchsorted(THRESHOLDS, u[straddles], side="right")
    return draws.astype(np.float64)
