"""--lengths: perplexity against context length, from one pass or a pass per length, equal to separate passes."""

import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import PROSE, WIKITEXT_VALID, lines, run_until
from reference import hf_recipe

from ppl_cli import Config, evaluate
from ppl_cli.cli import cli
from ppl_cli.config import parse_lengths
from ppl_cli.errors import PplError
from ppl_cli.output.metrics import LN2, poisson_weights

GOLDEN = Path(__file__).parent / "golden" / "smollm2-lengths.json"


def test_lengths_parse_as_a_list_or_a_range():
    assert parse_lengths("2048,4096, 8192") == (2048, 4096, 8192)
    assert parse_lengths("1024:4096:1024") == (1024, 2048, 3072, 4096)  # the stop is included
    assert parse_lengths("512,256,512") == (256, 512)
    for bad in ("", "a,b", "1024:512:256", "1:2", "8:16:0"):
        with pytest.raises(PplError, match="lengths"):
            parse_lengths(bad)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(context_field="q"), "lengths and context_field"),
        (dict(messages_field="m"), "lengths and messages_field"),
        (dict(chat_wrap=True), "lengths and chat_wrap=True"),
        (dict(convention="lm-eval"), "lengths and convention lm-eval"),
        (dict(window=64), "lengths and window"),
        (dict(detokenize="wikitext"), "lengths and detokenize"),
        (dict(min_tokens=5000), "min_tokens lowers the bar"),
    ],
)
def test_combinations_without_a_meaning_are_refused(options, message):
    with pytest.raises(PplError, match=message):
        Config(lengths=(1024, 4096), **options)
    with pytest.raises(PplError, match="min_tokens sets"):
        Config(min_tokens=10)


@pytest.fixture(scope="module")
def long_texts():
    """Documents from a few to a few hundred tokens of the tiny models' tokenizer."""
    return [" ".join(PROSE[(i + k) % len(PROSE)] for k in range(n)) for i, n in enumerate([1, 60, 9, 45, 80, 30, 70])]


@pytest.fixture(scope="module")
def dynamic_llama(tmp_path_factory, tiny_llama):
    """The tiny Llama with transformers' dynamic NTK RoPE: positions scaled by the input's length beyond 256."""
    path = tmp_path_factory.mktemp("dynamic-llama")
    shutil.copytree(tiny_llama, path, dirs_exist_ok=True)
    config = json.loads((path / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def write_corpus(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def separate_passes(model_path, texts, lengths, bos: bool):
    """YaRN's eval/perplexity.py written out: for each length in turn, each document cut to its first
    L tokens (BOS first when asked), one plain forward pass, every token after the first scored. Only
    documents with at least the largest length; float32 logits, per-token NLL summed in float64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    sequences = [([tokenizer.bos_token_id] if bos else []) + tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    kept = {i: ids for i, ids in enumerate(sequences) if len(ids) >= lengths[-1]}
    nll = {i: [] for i in kept}
    for length in lengths:
        for i, ids in kept.items():
            x = torch.tensor([ids[:length]])
            with torch.no_grad():
                logits = model(x).logits[0, :-1].float()
            nll[i].append(F.cross_entropy(logits, x[0, 1:], reduction="none").double().sum().item())
    return nll


@pytest.mark.parametrize("bos", [True, False])
@pytest.mark.parametrize("which,passes", [("tiny_llama", "one"), ("dynamic_llama", "per length")])
def test_every_length_equals_separate_passes(request, which, passes, bos, long_texts, tmp_path):
    """Ordinary RoPE: one pass, its prefix sums; dynamic RoPE (found without being told): a pass per length."""
    model = request.getfixturevalue(which)
    lengths = (24, 96, 160, 320) if which == "dynamic_llama" else (24, 96, 160)  # 320 is beyond the trained 256
    data = write_corpus(tmp_path / "c.jsonl", long_texts)
    config = Config(model=model, data=data, lengths=lengths, add_bos=bos, allow_beyond_context=True, bootstrap_samples=0, max_batch_tokens=4096)
    result = evaluate(config)
    assert result.summary["windowing"]["passes"] == passes
    assert ("length_dependence" in result.summary["windowing"]) == (passes == "per length")
    expected = separate_passes(model, long_texts, lengths, bos)
    rows = {row["index"]: row for row in result.documents}
    assert set(rows) == set(expected) and result.summary["length_curve"]["too_short_documents"] == len(long_texts) - len(expected)
    for i, nll in expected.items():
        assert rows[i]["lengths"]["nll"] == pytest.approx(nll, rel=1e-5)
        assert rows[i]["lengths"]["tokens"] == [n - 1 for n in lengths]
        assert rows[i]["nll_sum"] == pytest.approx(nll[-1], rel=1e-5) and rows[i]["tokens"] == lengths[-1] - 1


def test_the_probe_finds_length_dependence_the_configuration_does_not_name(dynamic_llama, tiny_llama):
    from transformers import AutoModelForCausalLM

    from ppl_cli.engine.length_probe import configured_dependence, probed_dependence

    dynamic = AutoModelForCausalLM.from_pretrained(dynamic_llama).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    cpu = torch.device("cpu")
    assert "dynamic" in configured_dependence(dynamic) and configured_dependence(plain) is None
    assert "differ by" in probed_dependence(dynamic, cpu, 24, 320)  # beyond the trained 256: scaled
    assert probed_dependence(dynamic, cpu, 24, 200) is None  # within it: no scaling, no dependence
    assert probed_dependence(plain, cpu, 24, 320) is None


@pytest.fixture(scope="module")
def min_tokens_run(tiny_llama, long_texts, tmp_path_factory):
    data = write_corpus(tmp_path_factory.mktemp("c") / "c.jsonl", long_texts)
    return evaluate(Config(model=tiny_llama, data=data, lengths=(16, 64, 128, 256), min_tokens=64, bootstrap_samples=200, seed=4))


def test_min_tokens_lets_each_length_have_the_documents_that_reach_it(min_tokens_run, long_texts, tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    n = [1 + len(tokenizer(t, add_special_tokens=False).input_ids) for t in long_texts]
    summary, rows = min_tokens_run.summary, min_tokens_run.documents
    curve = summary["length_curve"]
    assert curve["min_tokens"] == 64 and curve["too_short_documents"] == sum(k < 64 for k in n)
    assert [p["documents"] for p in curve["points"]] == [sum(k >= max(64, length) for k in n) for length in (16, 64, 128, 256)]
    for row in rows:
        text = long_texts[row["index"]]
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        for k, length in enumerate((16, 64, 128, 256)):
            if length > n[row["index"]]:
                assert row["lengths"]["nll"][k] is None
                continue
            cut = text[: encoded["offset_mapping"][length - 2][1]]  # BOS, then length - 1 tokens of text
            assert row["lengths"]["bytes"][k] == len(cut.encode("utf-8")) and row["lengths"]["words"][k] == len(cut.split())
        reached = max(i for i, x in enumerate(row["lengths"]["nll"]) if x is not None)
        assert row["bytes"] == row["lengths"]["bytes"][reached] and row["words"] == row["lengths"]["words"][reached]


def test_each_point_is_the_numpy_of_the_rows_and_its_interval_the_documented_bootstrap(min_tokens_run):
    rows, points = min_tokens_run.documents, min_tokens_run.summary["length_curve"]["points"]
    nll = np.array([[np.nan if x is None else x for x in r["lengths"]["nll"]] for r in rows])  # [n, K]
    tokens = np.array([[np.nan if x is None else x for x in r["lengths"]["tokens"]] for r in rows])
    n_bytes = np.array([[np.nan if x is None else x for x in r["lengths"]["bytes"]] for r in rows])
    weights = poisson_weights(np.random.default_rng(4), (200, len(rows)))  # the corpus's resamples (seed 4)
    for k, point in enumerate(points):
        have = ~np.isnan(nll[:, k])
        a, t, b = nll[have, k], tokens[have, k], n_bytes[have, k]
        assert point["documents"] == have.sum() and point["tokens"] == t.sum()
        assert point["token_perplexity"] == pytest.approx(math.exp(a.sum() / t.sum()), rel=1e-12)
        assert point["mean_document_perplexity"] == pytest.approx(np.mean(np.exp(a / t)), rel=1e-12)
        assert point["bits_per_byte"] == pytest.approx(a.sum() / (b.sum() * LN2), rel=1e-12)
        w = weights[:, have]
        ppl = np.exp((w @ a) / (w @ t))
        macro = (w @ np.exp(a / t)) / w.sum(axis=1)
        for name, values in (("token_perplexity", ppl), ("mean_document_perplexity", macro)):
            values = values[np.isfinite(values)]
            assert point["bootstrap"][name] == pytest.approx([np.percentile(values, 2.5), np.percentile(values, 97.5)], rel=1e-9)


def run_cli(*args):
    result = CliRunner().invoke(cli, ["run", "--quiet", *args])
    assert result.exit_code == 0, result.output
    return result


def curve_of(out):
    summary = json.loads((out / "summary.json").read_text())
    return summary["length_curve"], [json.loads(line) for line in lines(out / "documents.jsonl")]


def assert_same_curve(a, b):
    (curve_a, rows_a), (curve_b, rows_b) = a, b
    assert [r["index"] for r in rows_a] == [r["index"] for r in rows_b]
    for x, y in zip(rows_a, rows_b):
        assert [v is None for v in y["lengths"]["nll"]] == [v is None for v in x["lengths"]["nll"]]
        assert [v for v in y["lengths"]["nll"] if v is not None] == pytest.approx([v for v in x["lengths"]["nll"] if v is not None], rel=1e-9)
    assert curve_a["too_short_documents"] == curve_b["too_short_documents"]
    for p, q in zip(curve_a["points"], curve_b["points"]):
        assert q["documents"] == p["documents"] and q["tokens"] == p["tokens"]
        assert q["token_perplexity"] == pytest.approx(p["token_perplexity"], rel=1e-9)
        assert q["bootstrap"]["token_perplexity"] == pytest.approx(p["bootstrap"]["token_perplexity"], rel=1e-9)


def test_shards_merged_and_a_run_killed_then_resumed_equal_one_run(tiny_llama, long_texts, tmp_path):
    texts = long_texts * 6  # 42 documents: enough rows to be killed between
    data = write_corpus(tmp_path / "c.jsonl", texts)
    common = ["--model", tiny_llama, "--data", data, "--lengths", "16,64,128", "--min-tokens", "40", "--max-batch-tokens", "128"]
    run_cli(*common, "-o", str(tmp_path / "one"))
    one = curve_of(tmp_path / "one")
    for i in range(2):
        run_cli(*common, "--shard", f"{i}/2", "-o", str(tmp_path / f"s{i}"))
    merged = CliRunner().invoke(cli, ["merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "-o", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    assert_same_curve(one, curve_of(tmp_path / "merged"))
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "ppl_cli", "run", "--quiet", *common, "-o", str(out)]
    run_until(command, out, 12, signal.SIGKILL)
    run_cli(*common, "-o", str(out))
    assert_same_curve(one, curve_of(out))
    ranks = tmp_path / "ranks"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ppl_cli", "run", "--quiet",
                           *common, "-o", str(ranks)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_curve(one, curve_of(ranks))
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["context_curve"]["tokens"]  # the context curve keeps working


def test_sliding_protocol_is_a_hf_recipe_pass_per_length(tiny_llama, long_texts, tmp_path):
    """--lengths with --stride: windows of L tokens S apart, every document, each length its own pass."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_corpus(tmp_path / "c.jsonl", long_texts)
    result = evaluate(Config(model=tiny_llama, data=data, lengths=(32, 64), stride=16, bootstrap_samples=0))
    assert result.summary["windowing"]["protocol"] == "sliding" and result.summary["windowing"]["passes"] == "per length"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    rows = result.documents
    assert len(rows) == len(long_texts)  # no document is too short to slide over
    for row in rows:
        ids = [tokenizer.bos_token_id] + tokenizer(long_texts[row["index"]], add_special_tokens=False).input_ids
        for k, length in enumerate((32, 64)):
            nll, tokens = hf_recipe(model, ids, length, 16)
            assert row["lengths"]["nll"][k] == pytest.approx(nll, rel=1e-5) and row["lengths"]["tokens"][k] == tokens


def test_beyond_the_models_context_is_an_error_naming_both_numbers(tiny_llama, tmp_path):
    data = write_corpus(tmp_path / "c.jsonl", [" ".join(PROSE * 20)])  # long enough for 512 tokens: the model is what falls short
    result = CliRunner().invoke(cli, ["run", "--model", tiny_llama, "--data", data, "--lengths", "128,512"])
    assert result.exit_code == 2
    assert "--lengths up to 512 is longer than the model's context length (256)" in result.stderr and "--allow-beyond-context" in result.stderr


def test_compare_pairs_the_shared_lengths_and_report_draws_the_curves(tiny_llama, tiny_llama_64, long_texts, tmp_path):
    data = write_corpus(tmp_path / "c.jsonl", long_texts)
    run_cli("--model", tiny_llama, "--data", data, "--lengths", "16,64,128", "--min-tokens", "16", "-o", str(tmp_path / "a"))
    run_cli("--model", tiny_llama_64, "--data", data, "--lengths", "64:256:64", "--min-tokens", "64", "-o", str(tmp_path / "b"))
    done = CliRunner().invoke(cli, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json"])
    assert done.exit_code == 0, done.output
    entry = json.loads(done.stdout)["runs"][0]
    assert [p["length"] for p in entry["length_curve"]] == [64, 128] and entry["documents"]["at_length"] == 128
    (_, rows_a), (_, rows_b) = curve_of(tmp_path / "a"), curve_of(tmp_path / "b")
    for point, (i, j) in zip(entry["length_curve"], ((1, 0), (2, 1))):  # 64 and 128 in each run's own lengths
        by_index = {b["index"]: b for b in rows_b}
        pairs = [(a, by_index[a["index"]]) for a in rows_a if a["index"] in by_index]
        both = [(a, b) for a, b in pairs if a["lengths"]["nll"][i] is not None and b["lengths"]["nll"][j] is not None]
        assert point["documents"] == len(both)
        a_ppl = math.exp(sum(a["lengths"]["nll"][i] for a, _ in both) / sum(a["lengths"]["tokens"][i] for a, _ in both))
        b_ppl = math.exp(sum(b["lengths"]["nll"][j] for _, b in both) / sum(b["lengths"]["tokens"][j] for _, b in both))
        m = point["token_perplexity"]
        assert m["a"] == pytest.approx(a_ppl) and m["b"] == pytest.approx(b_ppl) and m["ci"][0] <= m["delta"] <= m["ci"][1]
    assert entry["token_perplexity"]["a"] == pytest.approx(entry["length_curve"][-1]["token_perplexity"]["a"])
    text = CliRunner().invoke(cli, ["compare", str(tmp_path / "a"), str(tmp_path / "b")]).output
    assert "token perplexity at each shared length" in text
    report = CliRunner().invoke(cli, ["report", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "r.html")])
    assert report.exit_code == 0, report.output
    page = (tmp_path / "r.html").read_text()
    assert "id='length_curve'" in page and page.count("<path") > 10
    chosen = CliRunner().invoke(cli, ["select", str(tmp_path / "a"), "--keep", "low", "--keep-fraction", "0.5", "-o", str(tmp_path / "low.jsonl")])
    assert chosen.exit_code == 0, chosen.output
    assert len(lines(tmp_path / "low.jsonl")) == round(len(rows_a) / 2)


def test_groups_each_have_their_curve(tiny_llama, long_texts, tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps({"text": t, "kind": "odd" if i % 2 else "even"}) + "\n" for i, t in enumerate(long_texts)))
    result = evaluate(Config(model=tiny_llama, data=str(path), lengths=(16, 64), min_tokens=16, group_by="kind", bootstrap_samples=0))
    rows = result.documents
    for name, group in result.summary["groups"].items():
        members = [r for r in rows if r["group"] == name]
        for k, point in enumerate(group["length_curve"]):
            have = [r for r in members if r["lengths"]["nll"][k] is not None]
            assert point["documents"] == len(have)
            assert point["nll_sum"] == pytest.approx(sum(r["lengths"]["nll"][k] for r in have))


@pytest.mark.slow
def test_smollm2_wikitext_articles_equal_the_separate_pass_reference(smollm2, monkeypatch):
    """SmolLM2-135M (float32) on the first WikiText-2 test articles at 512 to 4,096 tokens, against
    scripts/golden_lengths.py's separate passes, within 1e-5."""
    import ppl_cli.engine.loading

    golden = json.loads(GOLDEN.read_text())
    test_file = WIKITEXT_VALID.with_name(golden["data"])
    if not test_file.is_file():
        pytest.skip(f"WikiText-2 is not available: {test_file} is absent")
    monkeypatch.setattr(ppl_cli.engine.loading, "load_model", lambda config, local_rank=0, tokenizer=None: smollm2)
    config = Config(data=str(test_file), limit=golden["limit"], lengths=tuple(golden["lengths"]), bootstrap_samples=0)
    result = evaluate(config)
    assert result.summary["windowing"]["passes"] == "one"
    rows = {row["index"]: row for row in result.documents}
    assert sorted(rows) == [d["index"] for d in golden["documents"]]
    assert result.summary["length_curve"]["too_short_documents"] == len(golden["too_short"])
    for doc in golden["documents"]:
        assert rows[doc["index"]]["id"] == doc["id"]
        assert rows[doc["index"]]["lengths"]["nll"] == pytest.approx(doc["nll"], rel=1e-5)
