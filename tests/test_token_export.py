"""--save-tokens (per-token Parquet) and the context curve, against naive full-logits computations."""

import json
import math
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from reference import token_logprobs
from transformers import AutoModelForCausalLM, AutoTokenizer

from ppl_cli import Config, evaluate
from ppl_cli.cli import cli
from ppl_cli.errors import PplError


def saved_tokens(out) -> dict:
    table = pq.read_table(out / "tokens").sort_by([("index", "ascending"), ("position", "ascending")])
    return table.to_pydict()


def by_document(columns: dict) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for i, index in enumerate(columns["index"]):
        doc = out.setdefault(index, {k: [] for k in columns})
        for key in columns:
            doc[key].append(columns[key][i])
    return out


def run(model, data, out, *extra):
    result = CliRunner().invoke(cli, ["run", "-q", "--model", model, "--data", data, "--window", "32", "--save-tokens", "-o", str(out), *extra])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]


def test_every_scored_token_against_one_forward_pass(tiny_llama, corpus_jsonl, corpus_texts, tmp_path):
    rows = run(tiny_llama, corpus_jsonl, tmp_path / "out", "--window", "128")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), AutoTokenizer.from_pretrained(tiny_llama)
    docs = by_document(saved_tokens(tmp_path / "out"))
    assert sorted(docs) == [row["index"] for row in rows]
    checked = 0
    for row in rows:
        ids = [tokenizer.bos_token_id] + tokenizer(corpus_texts[row["index"]], add_special_tokens=False).input_ids
        doc = docs[row["index"]]
        assert doc["position"] == list(range(1, len(ids))) and doc["token_id"] == ids[1:]
        assert sum(doc["logprob"]) == pytest.approx(-row["nll_sum"], rel=1e-5)
        if len(ids) <= 128:  # one window: every token's distribution from a single forward pass
            with torch.no_grad():
                logq = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
            entropy = -(logq.exp() * logq).sum(-1)
            ranks = [int((logq[j] > logq[j, t]).sum()) + 1 for j, t in enumerate(ids[1:])]
            assert doc["logprob"] == pytest.approx(token_logprobs(model, ids).tolist(), abs=1e-4)
            assert doc["entropy"] == pytest.approx(entropy.tolist(), abs=1e-4)
            assert doc["rank"] == ranks
            assert doc["token"] == [tokenizer.decode([t]) for t in ids[1:]]
            checked += 1
    assert checked >= 3


def test_context_curve_against_one_forward_pass(tiny_llama, corpus_texts, tmp_path):
    short = [t for t in corpus_texts if len(t) < 400]  # each within one 128-token window
    (tmp_path / "short.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in short))
    result = evaluate(Config(model=tiny_llama, data=str(tmp_path / "short.jsonl"), window=128, bootstrap_samples=0))
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), AutoTokenizer.from_pretrained(tiny_llama)
    sums, counts = {}, {}
    for row in result.documents:
        ids = [tokenizer.bos_token_id] + tokenizer(short[row["index"]], add_special_tokens=False).input_ids
        assert len(ids) <= 128  # each document is one window: token j was predicted from j tokens
        for j, logprob in enumerate(token_logprobs(model, ids).tolist(), start=1):
            bucket = int(math.log2(j))
            sums[bucket] = sums.get(bucket, 0.0) - logprob
            counts[bucket] = counts.get(bucket, 0) + 1
    curve = result.summary["context_curve"]
    assert curve["tokens"] == [counts[b] for b in sorted(counts)]
    assert curve["context_tokens"][:3] == [[1, 1], [2, 3], [4, 7]]
    assert curve["mean_nll"] == pytest.approx([sums[b] / counts[b] for b in sorted(sums)], rel=1e-5)


def test_resume_after_a_kill_leaves_no_duplicate_or_missing_token(tiny_llama, corpus_jsonl, tmp_path):
    out = tmp_path / "out"
    rows = run(tiny_llama, corpus_jsonl, out, "--max-batch-tokens", "32")
    before = saved_tokens(out)
    lines = (out / "documents.jsonl").read_text().splitlines()
    # As if killed after writing the parts of every group but the rows of only 4 documents.
    (out / "documents.jsonl").write_text("\n".join(lines[:4]) + "\n")
    (out / "summary.json").unlink()
    run(tiny_llama, corpus_jsonl, out, "--max-batch-tokens", "32")
    after = saved_tokens(out)
    assert after["index"] == before["index"] and after["position"] == before["position"]
    assert after["logprob"] == pytest.approx(before["logprob"])
    counts = np.bincount(after["index"])
    assert [counts[row["index"]] for row in rows] == [row["tokens"] for row in rows]


def test_shards_merged_hold_the_single_runs_tokens(tiny_llama, corpus_jsonl, tmp_path):
    run(tiny_llama, corpus_jsonl, tmp_path / "single")
    for i in range(3):
        run(tiny_llama, corpus_jsonl, tmp_path / f"s{i}", "--shard", f"{i}/3")
    merged = CliRunner().invoke(cli, ["merge", *(str(tmp_path / f"s{i}") for i in range(3)), "-o", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    a, b = saved_tokens(tmp_path / "single"), saved_tokens(tmp_path / "merged")
    assert a["index"] == b["index"] and a["token_id"] == b["token_id"] and a["logprob"] == pytest.approx(b["logprob"])
    one = json.loads((tmp_path / "single" / "summary.json").read_text())["context_curve"]
    both = json.loads((tmp_path / "merged" / "summary.json").read_text())["context_curve"]
    assert both["tokens"] == one["tokens"] and both["mean_nll"] == pytest.approx(one["mean_nll"], rel=1e-9)


def test_torchrun_ranks_write_the_single_runs_tokens(tiny_llama, corpus_jsonl, tmp_path):
    from test_scale_out import torchrun

    run(tiny_llama, corpus_jsonl, tmp_path / "single")
    torchrun("--model", tiny_llama, "--data", corpus_jsonl, "--window", "32", "--save-tokens", "-o", str(tmp_path / "ddp"))
    a, b = saved_tokens(tmp_path / "single"), saved_tokens(tmp_path / "ddp")
    assert (a["index"], a["position"], a["token_id"]) == (b["index"], b["position"], b["token_id"])
    assert b["logprob"] == pytest.approx(a["logprob"], rel=1e-5) and b["entropy"] == pytest.approx(a["entropy"], rel=1e-5)


def test_with_a_reference_model_the_tokens_carry_its_log_probability_and_kl(tiny_llama, corpus_jsonl, tmp_path):
    run(tiny_llama, corpus_jsonl, tmp_path / "out", "--reference-model", tiny_llama)
    columns = saved_tokens(tmp_path / "out")
    assert columns["ref_logprob"] == columns["logprob"] and set(columns["kld"]) == {0.0}


def test_save_tokens_needs_an_output_directory(tiny_llama, corpus_jsonl):
    with pytest.raises(PplError, match=re.escape("save_tokens=True needs an output directory (output=DIR)")):
        Config(model=tiny_llama, data=corpus_jsonl, save_tokens=True)
