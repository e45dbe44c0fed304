"""A sampled run's estimates: each group's metrics and the corpus's, for the whole input, with
intervals that include the sampling. Pure functions over the summary's totals.

A group's metrics are ratios over its sampled documents (the ratio estimator); its documents are
sampled at the rate f = n/N (per group: n of its N documents; --sample: the share). The corpus
expands each group's sums by N/n (Horvitz-Thompson) before dividing. Intervals are the Poisson
bootstrap's, each group's resampled sums pulled toward its observed sums by sqrt(1 - f), the
finite-population correction of sampling without replacement (the rescaling bootstrap of Rao
and Wu, 1988): a group scored whole (f = 1) has no sampling error, one sampled sparsely keeps
the full bootstrap spread.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from .metrics import LN2, Totals, percentile_interval, perplexity, unit_metrics


def rate(plan: dict, group: str | None) -> float:
    """The share of a group's documents in the sample (the corpus's, ungrouped); the documents with
    nothing to score count in both the sample and the population."""
    if plan["method"] == "share":
        return plan["share"]
    return plan["sampled"][group] / plan["population"][group]


def corrected(totals: Totals, f: float) -> np.ndarray:
    """The resampled sums [B, 3] pulled toward the observed ones by sqrt(1 - f)."""
    observed = np.array([totals.nll, totals.tokens, totals.bytes], dtype=np.float64)
    return observed + math.sqrt(max(0.0, 1.0 - f)) * (totals.resampled - observed)


def interval_of(resampled: np.ndarray, seed: int, samples: int, confidence: float = 0.95) -> dict:
    nll, tokens, n_bytes = resampled.T
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ppl, bpb = np.exp(nll / tokens), nll / (n_bytes * LN2)
    return {
        "confidence": confidence,
        "samples": samples,
        "seed": seed,
        "method": "poisson, rescaled by sqrt(1 - f) for the sampling",
        "token_perplexity": percentile_interval(ppl, confidence),
        "bits_per_byte": percentile_interval(bpb, confidence),
    }


def group_interval(totals: Totals, f: float, seed: int) -> dict | None:
    """A sampled group's interval: its own resamples, corrected for the sampling."""
    if not (totals.samples and totals.documents):
        return None
    return interval_of(corrected(totals, f), seed, totals.samples)


def corpus_estimate(groups: dict[str, Totals], rates: dict[str, float], seed: int, samples: int) -> dict:
    """The corpus's metrics for the whole input: every group's sums expanded by 1 / f."""
    sums = np.zeros(4)  # nll, tokens, words, bytes
    resampled = np.zeros((samples, 3))
    for name, totals in groups.items():
        weight = 1.0 / rates[name]
        sums += weight * np.array([totals.nll, totals.tokens, totals.words, totals.bytes], dtype=np.float64)
        if samples:
            resampled += weight * corrected(totals, rates[name])
    nll, tokens, words, n_bytes = sums
    out = unit_metrics(float(nll), float(tokens), float(words), float(n_bytes))
    out.update(
        documents=sum(totals.documents / rates[name] for name, totals in groups.items()),
        bootstrap=interval_of(resampled, seed, samples) if samples and tokens else None,
    )
    return out


def macro_estimate(groups: dict[str, Totals], rates: dict[str, float], seed: int, samples: int, confidence: float = 0.95) -> dict:
    """The mean over groups of their token perplexity and bits per byte, bias-corrected: a group's
    estimate from a few documents is biased by about the mean of its corrected resamples minus its
    value, and the mean over many groups keeps that bias while its noise averages away, so the
    bootstrap's estimate of it is subtracted from the mean and twice it from the percentile interval."""
    present = [(name, g) for name, g in groups.items() if g.tokens]
    out = {"groups": len(present), "token_perplexity": None, "bits_per_byte": None, "bootstrap": None, "bias_corrected": True}
    if not present:
        return out
    observed = np.array([[perplexity(g.nll, g.tokens), g.nll / (g.bytes * LN2) if g.bytes else np.nan] for _, g in present])  # [G, 2]
    if not samples:
        out["token_perplexity"], out["bits_per_byte"] = float(observed[:, 0].mean()), float(np.nanmean(observed[:, 1]))
        return out
    resampled = np.stack([corrected(g, rates[name]) for name, g in present])  # [G, B, 3]
    nll, tokens, n_bytes = resampled[..., 0], resampled[..., 1], resampled[..., 2]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample in which a group (or every group) drew no token: NaN
        values = np.stack([np.where(tokens > 0, np.exp(nll / tokens), np.nan), np.where(n_bytes > 0, nll / (n_bytes * LN2), np.nan)], -1)  # [G, B, 2]
        bias = np.nanmean(values, axis=1) - observed  # [G, 2]
        means = np.nanmean(values, axis=0)  # [B, 2]: each resample's mean over groups
        corrected_mean, shift = np.nanmean(observed - bias, axis=0), 2 * np.nanmean(bias, axis=0)
    out["token_perplexity"], out["bits_per_byte"] = float(corrected_mean[0]), float(corrected_mean[1])
    intervals = [percentile_interval(means[:, k], confidence) for k in range(2)]
    out["bootstrap"] = {
        "confidence": confidence,
        "samples": samples,
        "seed": seed,
        "method": "poisson, rescaled by sqrt(1 - f) for the sampling, shifted by twice the estimated bias",
        "token_perplexity": [v - shift[0] for v in intervals[0]] if intervals[0] else None,
        "bits_per_byte": [v - shift[1] for v in intervals[1]] if intervals[1] else None,
    }
    return out
