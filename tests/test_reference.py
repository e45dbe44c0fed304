"""--reference-model: KL(P || Q), top-1 agreement and delta p against a naive full-logits loop."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from ppl_cli import Config, evaluate
from ppl_cli.cli import cli
from ppl_cli.engine.conventions import JOIN
from ppl_cli.errors import PplError
from ppl_cli.output.kl_statistics import KLD_PERCENTILES, Histogram, bins, document_histograms


@pytest.fixture(scope="session")
def tiny_llama_other(tiny_llama, tmp_path_factory):
    """The tiny Llama with perturbed weights: the same tokenizer, different predictions."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5 * p.std())
    path = tmp_path_factory.mktemp("tiny-llama-other")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(path)
    return str(path)


def naive_window(q, p, ids: list[int], first_scored: int) -> dict:
    """One window read whole by both models in float64: sums over the tokens ids[first_scored:]."""
    with torch.no_grad():
        lq = torch.log_softmax(q(torch.tensor([ids])).logits[0, :-1].double(), -1)
        lp = torch.log_softmax(p(torch.tensor([ids])).logits[0, :-1].double(), -1)
    out = {"kld": 0.0, "same_top": 0, "delta_p": 0.0, "ref_nll": 0.0, "nll": 0.0, "count": 0}
    for j in range(first_scored - 1, len(ids) - 1):  # position j predicts ids[j + 1]
        target = ids[j + 1]
        out["kld"] += float((lp[j].exp() * (lp[j] - lq[j])).sum())
        out["same_top"] += int(lp[j].argmax() == lq[j].argmax())
        out["delta_p"] += float(lq[j, target].exp() - lp[j, target].exp())
        out["ref_nll"] -= float(lp[j, target])
        out["nll"] -= float(lq[j, target])
        out["count"] += 1
    return out


def add(total, part):
    for key, value in part.items():
        total[key] = total.get(key, 0) + value
    return total


def naive_sliding(q, p, ids, window, stride):
    """The HF guide's windows (every token after the first scored once), each window read whole."""
    total, prev_end = {}, 1
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        if end > prev_end:
            add(total, naive_window(q, p, ids[begin:end], prev_end - begin))
        prev_end = end
        if end == len(ids):
            break
    return total


def naive_llama_cpp(q, p, ids, ctx, bos):
    """llama-perplexity's chunks: BOS over each chunk's first token, tokens after ctx/2 scored."""
    total = {}
    for k in range(len(ids) // ctx):
        chunk = ids[k * ctx : (k + 1) * ctx]
        add(total, naive_window(q, p, [bos] + chunk[1:], ctx // 2 + 1))
    return total


@pytest.mark.parametrize("batch_tokens", [32, 1000])  # one window per batch, or many padded together
def test_sliding_equals_a_naive_full_logits_loop(tiny_llama, tiny_llama_other, corpus_jsonl, corpus_texts, batch_tokens):
    q, p = (AutoModelForCausalLM.from_pretrained(m).eval() for m in (tiny_llama, tiny_llama_other))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    result = evaluate(Config(model=tiny_llama, reference_model=tiny_llama_other, data=corpus_jsonl, window=32, stride=16,
                             max_batch_tokens=batch_tokens, bootstrap_samples=0))  # fmt: skip
    totals = {}
    for doc, text in zip(result.documents, corpus_texts, strict=True):
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids
        naive = naive_sliding(q, p, ids, 32, 16)
        add(totals, naive)
        assert doc["tokens"] == naive["count"]
        assert doc["kld_sum"] == pytest.approx(naive["kld"], rel=1e-4)
        assert doc["same_top"] == naive["same_top"]
        assert doc["delta_p_sum"] == pytest.approx(naive["delta_p"], rel=1e-4, abs=1e-5)
        assert doc["ref_nll_sum"] == pytest.approx(naive["ref_nll"], rel=1e-5)
        assert doc["nll_sum"] == pytest.approx(naive["nll"], rel=1e-5)
    ref = result.summary["reference"]
    assert ref["kld_mean"]["value"] == pytest.approx(totals["kld"] / totals["count"], rel=1e-4)
    assert ref["same_top_p"]["value"] == totals["same_top"] / totals["count"]
    assert ref["perplexity"] == pytest.approx(math.exp(totals["ref_nll"] / totals["count"]), rel=1e-5)
    assert ref["ln_ppl_ratio"]["value"] == pytest.approx((totals["nll"] - totals["ref_nll"]) / totals["count"], rel=1e-4)
    assert 0 < ref["kld_mean"]["value"] and 0 < ref["same_top_p"]["value"] < 1


def test_the_reference_leaves_the_models_own_numbers_unchanged(tiny_llama, tiny_llama_other, corpus_jsonl):
    plain = evaluate(Config(model=tiny_llama, data=corpus_jsonl, window=32, bootstrap_samples=0)).documents
    paired = evaluate(Config(model=tiny_llama, reference_model=tiny_llama_other, data=corpus_jsonl, window=32, bootstrap_samples=0))
    assert [d["nll_sum"] for d in paired.documents] == [d["nll_sum"] for d in plain]  # bit for bit


def test_llama_cpp_convention_equals_its_chunk_loop(tiny_llama, tiny_llama_other, corpus_jsonl, corpus_texts):
    q, p = (AutoModelForCausalLM.from_pretrained(m).eval() for m in (tiny_llama, tiny_llama_other))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    result = evaluate(Config(model=tiny_llama, reference_model=tiny_llama_other, data=corpus_jsonl, window=64,
                             convention="llama-cpp", add_bos=True, bootstrap_samples=0))  # fmt: skip
    ids = tokenizer(JOIN.join(corpus_texts), add_special_tokens=False).input_ids
    naive = naive_llama_cpp(q, p, ids, 64, tokenizer.bos_token_id)
    ref = result.summary["reference"]
    assert result.summary["tokens"] == naive["count"]
    assert ref["kld_mean"]["value"] == pytest.approx(naive["kld"] / naive["count"], rel=1e-4)
    assert ref["same_top_p"]["value"] == naive["same_top"] / naive["count"]
    assert ref["delta_p_mean"]["value"] == pytest.approx(naive["delta_p"] / naive["count"], rel=1e-3, abs=1e-6)


def naive_lm_eval(q, p, tokens, prefix, max_len):
    """lm-evaluation-harness's rolling windows (tests/reference.py's port), each scored by both models."""
    total, predicted = {}, 0
    first = min(max_len, len(tokens))
    pairs = [([prefix] + tokens[: first - 1], tokens[:first])]
    predicted = first
    while predicted < len(tokens):
        length = min(len(tokens) - predicted, max_len)
        end = predicted + length
        pairs.append((tokens[end - max_len - 1 : end - 1], tokens[end - length : end]))
        predicted = end
    for context, continuation in pairs:
        whole = (context[: len(context) - (len(continuation) - 1)] + continuation)[-(max_len + 1) :]
        add(total, naive_window(q, p, whole, len(whole) - len(continuation)))
    return total


@pytest.mark.parametrize("convention", ["lm-eval", "hf-recipe"])
def test_the_other_conventions_equal_their_naive_loops(tiny_llama, tiny_llama_other, corpus_jsonl, corpus_texts, convention):
    q, p = (AutoModelForCausalLM.from_pretrained(m).eval() for m in (tiny_llama, tiny_llama_other))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    result = evaluate(Config(model=tiny_llama, reference_model=tiny_llama_other, data=corpus_jsonl, window=24, stride=8,
                             convention=convention, max_batch_tokens=200, bootstrap_samples=0))  # fmt: skip
    if convention == "lm-eval":
        naive = {}
        for text in corpus_texts:
            add(naive, naive_lm_eval(q, p, tokenizer(text, add_special_tokens=False).input_ids, tokenizer.bos_token_id, 24))
    else:  # the guide's windows over the joined text, no special tokens
        naive = naive_sliding(q, p, tokenizer(JOIN.join(corpus_texts), add_special_tokens=False).input_ids, 24, 8)
    ref = result.summary["reference"]
    assert result.summary["tokens"] == naive["count"]
    assert ref["kld_mean"]["value"] == pytest.approx(naive["kld"] / naive["count"], rel=1e-4)
    assert ref["same_top_p"]["value"] == naive["same_top"] / naive["count"]
    assert ref["perplexity"] == pytest.approx(math.exp(naive["ref_nll"] / naive["count"]), rel=1e-5)


def test_a_model_against_itself(tiny_llama, corpus_jsonl):
    result = evaluate(Config(model=tiny_llama, reference_model=tiny_llama, data=corpus_jsonl, window=32, bootstrap_samples=0))
    ref = result.summary["reference"]
    assert ref["kld_mean"] == {"value": 0.0, "uncertainty": 0.0}
    assert ref["same_top_p"]["value"] == 1.0 and ref["delta_p_mean"]["value"] == 0.0 and ref["delta_p_rms"]["value"] == 0.0
    assert ref["ppl_ratio"]["value"] == 1.0 and ref["perplexity"] == result.summary["token_perplexity"]
    assert set(ref["kld_percentiles"].values()) == {0.0} and ref["nll_correlation"] == pytest.approx(1.0)


def test_tokenizers_must_agree(tiny_llama, tiny_gpt2, corpus_jsonl):
    with pytest.raises(PplError, match=r"the tokenizers of .* differ: token id \d+ is"):
        evaluate(Config(model=tiny_llama, reference_model=tiny_gpt2, data=corpus_jsonl, window=32))


def test_shards_merge_and_resume_give_the_single_runs_reference(tiny_llama, tiny_llama_other, corpus_jsonl, tmp_path):
    common = ["run", "-q", "--model", tiny_llama, "--reference-model", tiny_llama_other, "--data", corpus_jsonl, "--window", "32"]
    single = CliRunner().invoke(cli, [*common, "-o", str(tmp_path / "single"), "--json"])
    assert single.exit_code == 0, single.output
    dirs = []
    for i in range(3):
        assert CliRunner().invoke(cli, [*common, "--shard", f"{i}/3", "-o", str(tmp_path / f"s{i}")]).exit_code == 0
        dirs.append(str(tmp_path / f"s{i}"))
    merged = CliRunner().invoke(cli, ["merge", *dirs, "-o", str(tmp_path / "merged"), "--json"])
    assert merged.exit_code == 0, merged.output
    a, b = json.loads(single.stdout)["reference"], json.loads(merged.stdout)["reference"]
    for key in ("kld_mean", "same_top_p", "delta_p_mean", "delta_p_rms", "ln_ppl_ratio", "ppl_ratio"):
        assert b[key]["value"] == pytest.approx(a[key]["value"], rel=1e-9), key
    assert b["kld_percentiles"] == pytest.approx(a["kld_percentiles"]) and b["delta_p_percentiles"] == pytest.approx(a["delta_p_percentiles"])
    # As if killed after 4 documents (the reference line of the fifth written, its row not): resume.
    out = tmp_path / "single"
    lines = (out / "documents.jsonl").read_text().splitlines()
    (out / "summary.json").unlink()
    (out / "documents.jsonl").write_text("\n".join(lines[:4]) + "\n")
    resumed = CliRunner().invoke(cli, [*common, "-o", str(out), "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["reference"]["kld_percentiles"] == a["kld_percentiles"]
    assert len((out / "reference.jsonl").read_text().splitlines()) == len(lines)  # one line a document, no duplicate


def test_cli_reference_options(tiny_llama, tiny_llama_other, corpus_jsonl):
    args = ["run", "-q", "--json", "--model", tiny_llama, "--data", corpus_jsonl, "--window", "32", "--reference-model", tiny_llama_other]
    result = CliRunner().invoke(cli, [*args, "--reference-dtype", "float32", "--reference-device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["reference"]["model"]["id"] == tiny_llama_other and summary["reference"]["model"]["dtype"] == "float32"
    assert summary["config"]["reference_model"] == tiny_llama_other
    bad = CliRunner().invoke(cli, [*args, "--reference-device", "cuda"])
    assert bad.exit_code == 2 and "torch sees no CUDA GPU" in bad.stderr


def test_histogram_percentiles_are_within_their_stated_error():
    rng = np.random.default_rng(3)
    values = np.concatenate([rng.lognormal(-5, 2, 5000), [0.0] * 10, -rng.lognormal(-12, 1, 20)])
    histogram = Histogram()
    for part in np.array_split(values, 7):  # documents added one by one
        histogram.add(document_histograms(0, {"kld": part, "delta_p": part})["kld"])
    got = histogram.percentiles(KLD_PERCENTILES)
    ordered = np.sort(values)
    assert got["max"] == ordered[-1] and got["min"] == ordered[0]  # exact
    for name, fraction in KLD_PERCENTILES[1:-1]:
        exact = np.percentile(ordered, fraction * 100)  # numpy's linear interpolation is llama.cpp's
        assert got[name] == pytest.approx(exact, rel=0.012, abs=1e-12), name
    assert list(bins(np.array([0.0, 1e-13, 1e-12, -1e-12, 1.0]))) == [0, 0, 1, -1, 1201]
