import math

import numpy as np
import pytest

import ppl_cli.output.metrics
from ppl_cli.output.metrics import (
    METRIC_KEYS,
    THRESHOLDS,
    corpus_metrics,
    count_bytes,
    count_words,
    perplexity,
    poisson_weights,
    unit_metrics,
)


def test_counts_on_original_text():
    assert count_words("  two\twords\n") == 2
    assert count_words("") == 0
    assert count_bytes("héllo") == 6  # é is two bytes in UTF-8
    assert count_bytes("🙂") == 4


def test_document_metrics_hand_computed():
    # 4 tokens with NLL ln(3) each: token perplexity 3.
    nll = 4 * math.log(3)
    m = unit_metrics(nll, tokens=4, words=2, n_bytes=8)
    assert list(m) == list(METRIC_KEYS)
    assert m["token_perplexity"] == pytest.approx(3.0)
    assert m["word_perplexity"] == pytest.approx(9.0)  # exp(4 ln3 / 2) = 3^2
    assert m["byte_perplexity"] == pytest.approx(math.sqrt(3.0))  # exp(4 ln3 / 8) = 3^0.5
    assert m["bits_per_byte"] == pytest.approx(math.log2(3) / 2)


def test_no_units_is_none_not_a_division_by_zero():
    m = unit_metrics(0.0, tokens=0, words=0, n_bytes=0)
    assert m["token_perplexity"] is None and m["word_perplexity"] is None
    assert m["byte_perplexity"] is None and m["bits_per_byte"] is None
    assert perplexity(1e6, 1) == math.inf


def test_corpus_is_a_ratio_of_sums_and_macro_is_a_mean():
    docs = [unit_metrics(2 * math.log(2), 2, 1, 4), unit_metrics(6 * math.log(4), 6, 3, 12)]
    c = corpus_metrics(docs, bootstrap_samples=0)
    assert c["nll_sum"] == pytest.approx(2 * math.log(2) + 6 * math.log(4))
    assert (c["tokens"], c["words"], c["bytes"]) == (8, 4, 16)
    assert c["token_perplexity"] == pytest.approx(math.exp((2 * math.log(2) + 6 * math.log(4)) / 8))
    assert c["macro_token_perplexity"] == pytest.approx((2 + 4) / 2)
    assert c["bootstrap"] is None


def poisson_draw(u: int) -> int:
    """Inversion by hand: the smallest k with u < 2^32 * P(X <= k), X ~ Poisson(1)."""
    k, cdf = 0, math.exp(-1)
    while u >= round(cdf * 2**32):
        k += 1
        cdf += math.exp(-1) / math.factorial(k)
    return k


@pytest.mark.parametrize("chunk", [None, 10])  # one chunk of documents, or chunks of 10
def test_bootstrap_matches_a_naive_poisson_loop(monkeypatch, chunk):
    samples, n = 60, 37
    if chunk:
        monkeypatch.setattr(ppl_cli.output.metrics, "BOOTSTRAP_ELEMENTS", samples * chunk)
    rng = np.random.default_rng(7)
    nll = rng.uniform(10, 50, n)
    tokens = rng.integers(5, 30, n)
    docs = [unit_metrics(float(a), int(t), 3, int(t) * 4) for a, t in zip(nll, tokens)]
    got = corpus_metrics(docs, samples, seed=3)["bootstrap"]
    # The documented procedure: Poisson(1) weights by inversion of uint32 draws, documents in order,
    # `chunk` documents at a time, each chunk's draws shaped [samples, chunk].
    draw = np.random.default_rng(3)
    sums = [[0.0, 0, 0] for _ in range(samples)]
    step = chunk or n
    for start in range(0, n, step):
        part = range(start, min(start + step, n))
        u = draw.integers(0, 2**32, size=(samples, len(part)), dtype=np.uint32)
        for s in range(samples):
            for j, i in enumerate(part):
                w = poisson_draw(int(u[s, j]))
                sums[s][0] += w * nll[i]
                sums[s][1] += w * tokens[i]
                sums[s][2] += w * tokens[i] * 4
    ppl = [math.exp(a / t) for a, t, _ in sums]
    bpb = [a / (b * math.log(2)) for a, _, b in sums]
    assert got["token_perplexity"] == pytest.approx([np.percentile(ppl, 2.5), np.percentile(ppl, 97.5)], rel=1e-12)
    assert got["bits_per_byte"] == pytest.approx([np.percentile(bpb, 2.5), np.percentile(bpb, 97.5)], rel=1e-12)
    assert got["seed"] == 3 and got["samples"] == samples and got["confidence"] == 0.95 and got["method"] == "poisson"


def test_poisson_weights_are_poisson_one():
    u_rng, w_rng = np.random.default_rng(11), np.random.default_rng(11)
    u = u_rng.integers(0, 2**32, size=(200, 5000), dtype=np.uint32)
    weights = poisson_weights(w_rng, (200, 5000))
    assert np.array_equal(weights, np.searchsorted(THRESHOLDS, u, side="right"))  # the table is only a shortcut
    assert weights.mean() == pytest.approx(1.0, abs=0.005) and weights.var() == pytest.approx(1.0, abs=0.01)
    assert (weights == 0).mean() == pytest.approx(math.exp(-1), abs=0.003)
    edge = np.array([THRESHOLDS[0] - 1, THRESHOLDS[0], THRESHOLDS[1] - 1, THRESHOLDS[1]], dtype=np.uint32)
    assert [poisson_draw(int(x)) for x in edge] == [0, 1, 1, 2]
    assert list(np.searchsorted(THRESHOLDS, edge, side="right")) == [0, 1, 1, 2]


def test_bootstrap_is_seeded_and_brackets_the_point_estimate():
    docs = [unit_metrics(float(10 + i), 10, 5, 40) for i in range(20)]
    a = corpus_metrics(docs, 200, seed=1)
    assert a == corpus_metrics(docs, 200, seed=1)
    low, high = a["bootstrap"]["token_perplexity"]
    assert low <= a["token_perplexity"] <= high
    assert corpus_metrics(docs, 200, seed=2)["bootstrap"] != a["bootstrap"]


def test_one_document_has_no_interval_and_says_why():
    """A resample of one document holds it or nothing: its only value is the document's, no interval."""
    docs = [unit_metrics(5.0, 5, 2, 10)]
    boot = corpus_metrics(docs, 50)["bootstrap"]
    assert boot["token_perplexity"] is None and boot["missing"] == "one document" and boot["documents"] == 1
    two = corpus_metrics([unit_metrics(5.0, 5, 2, 10), unit_metrics(5.0, 5, 2, 10)], 50)["bootstrap"]
    assert two["token_perplexity"] == pytest.approx([math.e, math.e]) and two["documents"] == 2
