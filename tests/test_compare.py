"""`ppl-eval compare` against a naive paired bootstrap written here, and through the CLI."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from test_metrics import poisson_draw

from ppl_cli.cli import cli
from ppl_cli.commands.compare import CompareConfig, compare_runs, paired_p_value
from ppl_cli.errors import PplError
from ppl_cli.output.metrics import unit_metrics

METRICS = {
    "token_perplexity": lambda nll, t, w, b: math.exp(nll / t),
    "bits_per_byte": lambda nll, t, w, b: nll / (b * math.log(2)),
    "word_perplexity": lambda nll, t, w, b: math.exp(nll / w),
    "byte_perplexity": lambda nll, t, w, b: math.exp(nll / b),
}


def write_run(path, nll, tokens, words, n_bytes, fingerprint="sha256-sum:" + "0" * 64, window=32, ids=None):
    """A result directory as `run` writes it, from known per-document numbers."""
    path.mkdir(parents=True)
    rows = [
        {"index": i, "id": ids[i] if ids else f"d{i}", **unit_metrics(float(a), int(t), int(w), int(b))}
        for i, (a, t, w, b) in enumerate(zip(nll, tokens, words, n_bytes))
    ]
    (path / "documents.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "documents": len(rows),
        "windowing": {"convention": "sliding", "window": window, "stride": window // 2, "add_bos": True},
        "data": {"fingerprint": fingerprint},
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return str(path)


@pytest.fixture
def two_runs(tmp_path):
    rng = np.random.default_rng(4)
    n = 23
    tokens = rng.integers(20, 200, n)
    words = tokens // 2 + 1
    n_bytes = tokens * 4
    nll_a = tokens * rng.uniform(2.0, 3.0, n)
    nll_b = nll_a * rng.uniform(0.9, 1.02, n)  # mostly better
    a = write_run(tmp_path / "a", nll_a, tokens, words, n_bytes)
    b = write_run(tmp_path / "b", nll_b, tokens, words, n_bytes)
    return a, b, (nll_a, nll_b, tokens, words, n_bytes)


def test_interval_and_p_value_match_a_naive_paired_bootstrap(two_runs):
    a, b, (nll_a, nll_b, tokens, words, n_bytes) = two_runs
    samples = 300
    got = compare_runs(CompareConfig((a, b), bootstrap_samples=samples, seed=9))
    # The documented procedure: one Poisson(1) weight per document and resample, the same for both
    # runs, drawn by inversion from default_rng(seed) as uint32 of shape [samples, documents].
    u = np.random.default_rng(9).integers(0, 2**32, size=(samples, len(tokens)), dtype=np.uint32)
    for metric, value in METRICS.items():
        deltas = []
        for s in range(samples):
            w = [poisson_draw(int(x)) for x in u[s]]
            sums = [sum(wi * x for wi, x in zip(w, column)) for column in (nll_a, nll_b, tokens, words, n_bytes)]
            deltas.append(value(sums[1], *sums[2:]) - value(sums[0], *sums[2:]))
        observed = value(nll_b.sum(), tokens.sum(), words.sum(), n_bytes.sum()) - value(nll_a.sum(), tokens.sum(), words.sum(), n_bytes.sum())
        centred = [abs(d - np.mean(deltas)) for d in deltas]
        p = (1 + sum(c >= abs(observed) for c in centred)) / (1 + samples)
        m = got[metric]
        assert m["a"] == pytest.approx(value(nll_a.sum(), tokens.sum(), words.sum(), n_bytes.sum()), rel=1e-12)
        assert m["delta"] == pytest.approx(observed, rel=1e-9)
        assert m["ci"] == pytest.approx([np.percentile(deltas, 2.5), np.percentile(deltas, 97.5)], rel=1e-9)
        assert m["p_value"] == pytest.approx(p)
    assert got["token_perplexity"]["delta"] < 0 and got["token_perplexity"]["p_value"] < 0.05
    assert got["runs"][0]["token_perplexity"] == got["token_perplexity"]


def test_most_changed_documents_and_share_better(two_runs):
    a, b, (nll_a, nll_b, tokens, _, _) = two_runs
    got = compare_runs(CompareConfig((a, b), bootstrap_samples=10, top=3))
    change = nll_b / tokens - nll_a / tokens
    assert got["documents"]["better"] == int((change < 0).sum()) and got["documents"]["compared"] == len(tokens)
    assert got["documents"]["better_share"] == pytest.approx((change < 0).mean())
    improved = [d["index"] for d in got["most_improved"]]
    assert improved == list(np.argsort(change)[:3])
    assert [d["change_nats_per_token"] for d in got["most_improved"]] == pytest.approx(sorted(change)[:3])
    assert [d["index"] for d in got["most_worsened"]] == [i for i in np.argsort(-change)[:3] if change[i] > 0]


def test_identical_runs_give_delta_zero_and_p_value_one(two_runs, tmp_path):
    a, _, _ = two_runs
    got = compare_runs(CompareConfig((a, a), bootstrap_samples=200))
    for metric in METRICS:
        assert got[metric]["delta"] == 0 and got[metric]["p_value"] == 1 and got[metric]["ci"] == [0, 0]
    assert got["documents"]["better"] == 0 and got["most_improved"] == [] and got["most_worsened"] == []


def test_p_value_hand_checked():
    # Deltas 1, 2, 3 re-centred: |-1|, 0, 1; observed 1: two of three are at least as far from zero.
    assert paired_p_value(np.array([1.0, 2.0, 3.0]), 1.0) == (1 + 2) / (1 + 3)
    assert paired_p_value(np.array([1.0, 2.0, 3.0]), -5.0) == 1 / 4


def test_several_runs_against_one_baseline(two_runs, tmp_path):
    a, b, (nll_a, _, tokens, words, n_bytes) = two_runs
    c = write_run(tmp_path / "c", nll_a * 1.1, tokens, words, n_bytes)
    got = compare_runs(CompareConfig((a, b, c), bootstrap_samples=50))
    assert [r["run"] for r in got["runs"]] == [b, c] and "token_perplexity" not in got
    assert got["runs"][1]["token_perplexity"]["delta"] > 0
    alone = compare_runs(CompareConfig((a, c), bootstrap_samples=50))
    assert got["runs"][1]["token_perplexity"]["delta"] == alone["token_perplexity"]["delta"]


def test_refusals_name_the_difference(two_runs, tmp_path):
    a, _, (nll_a, _, tokens, words, n_bytes) = two_runs
    other = write_run(tmp_path / "other", nll_a, tokens, words, n_bytes, fingerprint="sha256-sum:" + "1" * 64)
    with pytest.raises(PplError, match="scored different data .*--allow-different-data"):
        compare_runs(CompareConfig((a, other)))
    wider = write_run(tmp_path / "wide", nll_a, tokens, words, n_bytes, window=64)
    with pytest.raises(PplError, match="scored the documents differently: window 64 vs 32"):
        compare_runs(CompareConfig((a, wider)))
    with pytest.raises(PplError, match="is not a finished ppl-eval run"):
        compare_runs(CompareConfig((a, str(tmp_path / "nothing"))))
    with pytest.raises(PplError, match="at least two"):
        compare_runs(CompareConfig((a,)))  # one directory is a series, or refused
    with pytest.raises(PplError, match="at least two"):
        CompareConfig(())


def test_allow_different_data_compares_the_documents_both_scored(two_runs, tmp_path):
    a, _, (nll_a, _, tokens, words, n_bytes) = two_runs
    ids = [f"d{i}" if i % 5 else f"changed{i}" for i in range(len(tokens))]
    fewer = write_run(tmp_path / "fewer", nll_a[:15] * 0.9, tokens[:15], words[:15], n_bytes[:15], fingerprint="sha256-sum:" + "2" * 64, ids=ids)
    got = compare_runs(CompareConfig((a, fewer), allow_different_data=True, bootstrap_samples=20))
    both = [i for i in range(15) if i % 5]  # same index and same id
    assert got["documents"]["compared"] == len(both) and got["matched_by"] == "index and id"
    expected = math.exp(nll_a[both].sum() * 0.9 / tokens[both].sum())
    assert got["token_perplexity"]["b"] == pytest.approx(expected)


def test_compare_through_the_cli_on_real_runs(tiny_gpt2, tiny_llama, corpus_jsonl, tmp_path):
    runs = []
    for name, model in (("gpt2", tiny_gpt2), ("gpt2-again", tiny_gpt2)):
        out = tmp_path / name
        done = CliRunner().invoke(cli, ["run", "-q", "--model", model, "--data", corpus_jsonl, "--window", "32", "-o", str(out)])
        assert done.exit_code == 0, done.output
        runs.append(str(out))
    human = CliRunner().invoke(cli, ["compare", *runs])
    assert human.exit_code == 0, human.output
    assert "token perplexity" in human.stdout and "+0.0000" in human.stdout and "p = 1.0000" in human.stdout
    as_json = json.loads(CliRunner().invoke(cli, ["compare", *runs, "--json"]).stdout)
    assert set(as_json["token_perplexity"]) == {"a", "b", "delta", "ci", "p_value", "test", "documents"}
    assert as_json["token_perplexity"]["test"] == "exact sign-flip permutation" and as_json["token_perplexity"]["documents"] == 9
    markdown = CliRunner().invoke(cli, ["compare", *runs, "--markdown"]).stdout
    assert markdown.startswith("| run | metric |") and len(markdown.strip().splitlines()) == 2 + 4
    other = tmp_path / "llama"
    CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama, "--data", corpus_jsonl, "--window", "48", "-o", str(other)])
    refused = CliRunner().invoke(cli, ["compare", runs[0], str(other)])
    assert refused.exit_code == 3 and "window 48 vs 32" in refused.stderr and len(refused.stderr.splitlines()) == 1
