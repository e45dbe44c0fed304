import math

import numpy as np
import pytest

from ppl_cli.metrics import (
    METRIC_KEYS,
    bootstrap_interval,
    corpus_metrics,
    count_bytes,
    count_words,
    perplexity,
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


def test_bootstrap_matches_a_naive_loop():
    rng = np.random.default_rng(7)
    nll = rng.uniform(10, 50, 37)
    tokens = rng.integers(5, 30, 37)
    n_bytes = tokens * 4
    got = bootstrap_interval(nll, tokens, n_bytes, samples=400, seed=3)
    # The documented procedure, one resample at a time.
    draw = np.random.default_rng(3)
    ppl, bpb = [], []
    for _ in range(400):
        idx = draw.integers(0, 37, size=37)
        ppl.append(math.exp(nll[idx].sum() / tokens[idx].sum()))
        bpb.append(nll[idx].sum() / (n_bytes[idx].sum() * math.log(2)))
    assert got["token_perplexity"] == pytest.approx([np.percentile(ppl, 2.5), np.percentile(ppl, 97.5)], rel=1e-12)
    assert got["bits_per_byte"] == pytest.approx([np.percentile(bpb, 2.5), np.percentile(bpb, 97.5)], rel=1e-12)
    assert got["seed"] == 3 and got["samples"] == 400 and got["confidence"] == 0.95


def test_bootstrap_is_seeded_and_brackets_the_point_estimate():
    docs = [unit_metrics(float(10 + i), 10, 5, 40) for i in range(20)]
    a = corpus_metrics(docs, 200, seed=1)
    assert a == corpus_metrics(docs, 200, seed=1)
    low, high = a["bootstrap"]["token_perplexity"]
    assert low <= a["token_perplexity"] <= high
    assert corpus_metrics(docs, 200, seed=2)["bootstrap"] != a["bootstrap"]


def test_bootstrap_of_one_document_is_its_value():
    docs = [unit_metrics(5.0, 5, 2, 10)]
    boot = corpus_metrics(docs, 50)["bootstrap"]
    assert boot["token_perplexity"] == pytest.approx([math.e, math.e])
