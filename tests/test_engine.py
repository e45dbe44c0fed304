"""The scoring engine against naive references on tiny random models loaded through --model PATH."""

import json
import math

import pytest
import torch
from reference import hf_recipe, rolling_disjoint, token_logprobs
from transformers import AutoModelForCausalLM, AutoTokenizer

from ppl_cli import Config, evaluate
from ppl_cli.engine.base import Job, plan_batches
from ppl_cli.engine.transformers_engine import TransformersEngine

REL = 1e-5


def load_reference(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def run(model_dir, data, **options):
    return evaluate(Config(model=model_dir, data=data, bootstrap_samples=0, **options))


@pytest.mark.parametrize("model_name", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("window,stride", [(32, 16), (32, 1), (17, 5), (64, 63), (128, 64)])
def test_equals_hf_recipe_without_bos(request, model_name, corpus_jsonl, corpus_texts, window, stride):
    model_dir = request.getfixturevalue(model_name)
    model, tokenizer = load_reference(model_dir)
    result = run(model_dir, corpus_jsonl, window=window, stride=stride, add_bos=False)
    assert [d["index"] for d in result.documents] == list(range(len(corpus_texts)))
    for doc, text in zip(result.documents, corpus_texts):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        nll, count = hf_recipe(model, ids, window, stride)
        assert doc["tokens"] == count == len(ids) - 1
        assert doc["nll_sum"] == pytest.approx(nll, rel=REL)


@pytest.mark.parametrize("model_name", ["tiny_gpt2", "tiny_llama"])
def test_short_document_equals_one_forward_pass_with_bos(request, model_name, corpus_jsonl, corpus_texts):
    model_dir = request.getfixturevalue(model_name)
    model, tokenizer = load_reference(model_dir)
    result = run(model_dir, corpus_jsonl, window=128)  # BOS on by default: both tokenizers define one
    assert result.summary["windowing"]["add_bos"] is True
    short = [(d, t) for d, t in zip(result.documents, corpus_texts) if len(tokenizer(t).input_ids) < 127]
    assert len(short) >= 3
    for doc, text in short:
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids
        logprobs = token_logprobs(model, ids)
        assert doc["tokens"] == len(ids) - 1  # with BOS every real token is scored
        assert doc["nll_sum"] == pytest.approx(-logprobs.sum().item(), rel=REL)


@pytest.mark.parametrize("stride", [16, 40])
def test_stride_at_least_window_is_rolling_disjoint_windows(tiny_llama, corpus_jsonl, corpus_texts, stride):
    model, tokenizer = load_reference(tiny_llama)
    result = run(tiny_llama, corpus_jsonl, window=16, stride=stride)
    for doc, text in zip(result.documents, corpus_texts):
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids
        nll, count = rolling_disjoint(model, ids, 16)
        assert doc["tokens"] == count
        assert doc["nll_sum"] == pytest.approx(nll, rel=REL)


def test_batch_size_padding_and_order_change_nothing(tiny_llama, tmp_path, corpus_texts):
    forward = tmp_path / "forward.jsonl"
    forward.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts))
    backward = tmp_path / "backward.jsonl"
    backward.write_text("".join(json.dumps({"text": t}) + "\n" for t in reversed(corpus_texts)))
    base = run(tiny_llama, str(forward), window=48, stride=20, max_batch_tokens=48).documents
    for batch_tokens in (100, 480, 100_000):  # 2, 10 and all windows of a group per batch, padded
        other = run(tiny_llama, str(forward), window=48, stride=20, max_batch_tokens=batch_tokens).documents
        for a, b in zip(base, other):
            assert a["tokens"] == b["tokens"]
            assert b["nll_sum"] == pytest.approx(a["nll_sum"], rel=REL)
    reverse = run(tiny_llama, str(backward), window=48, stride=20, max_batch_tokens=480).documents[::-1]
    for a, b in zip(base, reverse):
        assert b["nll_sum"] == pytest.approx(a["nll_sum"], rel=REL)


def test_corpus_metrics_are_ratios_of_document_sums(tiny_gpt2, corpus_jsonl, corpus_texts):
    result = run(tiny_gpt2, corpus_jsonl, window=64)
    s, docs = result.summary, result.documents
    nll = sum(d["nll_sum"] for d in docs)
    n_bytes = sum(len(t.encode("utf-8")) for t in corpus_texts)
    words = sum(len(t.split()) for t in corpus_texts)
    assert s["nll_sum"] == pytest.approx(nll)
    assert s["token_perplexity"] == pytest.approx(math.exp(nll / s["tokens"]))
    assert s["words"] == words and s["bytes"] == n_bytes
    assert s["word_perplexity"] == pytest.approx(math.exp(nll / words))
    assert s["byte_perplexity"] == pytest.approx(math.exp(nll / n_bytes))
    assert s["bits_per_byte"] == pytest.approx(nll / (n_bytes * math.log(2)))


def test_plan_batches_respects_the_token_budget():
    lengths = [10, 3, 7, 10, 1, 8]
    batches = plan_batches(lengths, 20)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 20
    assert plan_batches([50], 20) == [[0]]  # longer than the budget: a batch of its own
    assert plan_batches(lengths, 20, max_rows=1) == [[0], [3], [5], [2], [1], [4]]  # one window a batch (LLM.int8), longest first


def test_split_head_is_used_and_full_logits_fallback_agrees(tiny_llama):
    model, _ = load_reference(tiny_llama)
    scorer = TransformersEngine(model, torch.device("cpu"), 256)
    assert scorer.split_head
    tokens = torch.tensor([5, 9, 30, 2, 77, 13, 8, 41, 3, 99, 12])
    jobs = [Job(tokens, 1, 10), Job(tokens[:6], 1, 6), Job(tokens[2:], 4, 9)]  # reads: all but the last, or all
    split = scorer.score(jobs)
    scorer.split_head = False
    full = scorer.score(jobs)
    assert [s.sums["nll_sum"] for s in split] == pytest.approx([s.sums["nll_sum"] for s in full], rel=REL)
    logprobs = token_logprobs(model, tokens.tolist())
    assert split[0].sums["nll_sum"] == pytest.approx(-logprobs.sum().item(), rel=REL)
    assert split[0].sums["nll_sq_sum"] == pytest.approx((logprobs**2).sum().item(), rel=REL)  # sum of squared NLLs
