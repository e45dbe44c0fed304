"""--signals: Min-K%, Min-K%++, the zlib ratio, mean entropy and the reference ratio, against the
published formulas on full logits, over windows, conditional documents and every way a run is split."""

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import PROSE
from reference import masked_distributions, poisson_weights_by_hand, published_signals, recipe_distributions
from test_prompts import CHATS, PAIRS, naive_conversation, write_jsonl

from ppl_cli import Config, evaluate
from ppl_cli.cli import cli
from ppl_cli.errors import PplError
from ppl_cli.output.metrics import BOOTSTRAP_ELEMENTS
from ppl_cli.output.signals import SIGNALS, document_signals, lowest_mean, zlib_size

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = 200
PUBLISHED = ("min_k", "min_k_plus_plus", "zlib_ratio", "mean_entropy")


def load(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def texts():
    """A 2-token document, a few middling ones and one of more than three 32-token windows."""
    out = ["the", PROSE[0], " ".join(PROSE[1:3]), " ".join(PROSE[2:7]), " ".join(PROSE * 2)]
    return out + [" ".join(PROSE[k : k + 2]) for k in range(3, 8)]


def rows_of(result):
    return list(result.iter_documents())


def test_lowest_mean_and_document_signals_by_hand():
    values = np.array([3.0, 1.0, 2.0, 5.0, 4.0])
    assert lowest_mean(values, 0.4) == 1.5  # int(5 x 0.4) = 2 smallest: 1, 2
    assert lowest_mean(values, 0.1) == 1.0  # int(0.5) = 0: at least one
    assert lowest_mean(values, 1.0) == 3.0
    tokens = {"nll": np.array([1.0, 2.0, 3.0, 4.0]), "entropy": np.array([0.5, 1.5, 1.0, 1.0]), "z": np.array([0.0, -1.0, -3.0, 2.0])}
    got = document_signals(tokens, ["ab", "c"], 0.5, {"nll_sum": 10.0, "tokens": 4, "ref_nll_sum": 8.0})
    assert zlib_size(["ab", "c"]) == len(zlib.compress(b"abc")) == 11
    assert got == {"min_k": -3.5, "min_k_plus_plus": -2.0, "zlib_ratio": 2.5 / 11, "mean_entropy": 1.0, "reference_ratio": 1.25}
    assert document_signals(tokens, ["abc"], 0.5, {"nll_sum": 10.0, "tokens": 4, "ref_nll_sum": 0.0})["reference_ratio"] is None


def test_signals_equal_the_published_formulas_over_windows(tiny_llama_64, tiny_llama, tmp_path):
    model, tokenizer = load(tiny_llama_64)
    reference, _ = load(tiny_llama)
    documents = texts()
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in documents])
    config = Config(model=tiny_llama_64, data=data, window=32, stride=16, add_bos=False, signals=True, min_k=0.3, reference_model=tiny_llama, bootstrap_samples=0)
    rows = rows_of(evaluate(config))
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in documents]
    assert min(map(len, ids)) == 2 and max(map(len, ids)) > 3 * 32  # a single scored token, and a document of many windows
    assert [r["index"] for r in rows] == list(range(len(documents)))
    for row, text, doc_ids in zip(rows, documents, ids):
        expected = published_signals(recipe_distributions(model, doc_ids, 32, 16), text, 0.3)
        ref_nll = -sum(logp[t].item() for t, logp in recipe_distributions(reference, doc_ids, 32, 16))
        assert row["nll_sum"] == pytest.approx(expected["nll_sum"], rel=1e-5)
        for name in PUBLISHED:
            assert row[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-5), (row["index"], name)
        assert row["reference_ratio"] == pytest.approx(expected["nll_sum"] / ref_nll, rel=1e-5)


def test_pairs_and_conversations_have_the_signals_of_their_scored_tokens(tiny_llama, tiny_chat, tmp_path):
    model, tokenizer = load(tiny_llama)
    data = write_jsonl(tmp_path / "qa.jsonl", PAIRS)
    rows = rows_of(evaluate(Config(model=tiny_llama, data=data, context_field="q", text_field="a", window=256, signals=True, bootstrap_samples=0)))
    for row, pair in zip(rows, PAIRS):
        context, continuation = pair["q"].rstrip(), pair["q"][len(pair["q"].rstrip()) :] + pair["a"]  # lm-eval's whitespace rule
        context_ids = tokenizer(context, add_special_tokens=False).input_ids
        whole = [tokenizer.bos_token_id] + context_ids + tokenizer(context + continuation, add_special_tokens=False).input_ids[len(context_ids) :]
        expected = published_signals(masked_distributions(model, whole, list(range(1 + len(context_ids), len(whole)))), pair["a"], 0.2)
        for name in PUBLISHED:
            assert row[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-5), name

    model, tokenizer = load(tiny_chat)
    data = write_jsonl(tmp_path / "chats.jsonl", CHATS)
    rows = rows_of(evaluate(Config(model=tiny_chat, data=data, messages_field="messages", window=512, signals=True, bootstrap_samples=0)))
    chats = [c for c in CHATS if any(m["role"] == "assistant" for m in c["messages"])]
    assert len(rows) == len(chats)
    for row, chat in zip(rows, chats):
        ids, scored, contents = naive_conversation(tokenizer, chat["messages"])
        expected = published_signals(masked_distributions(model, ids, scored), "".join(contents), 0.2)  # the scored turns' contents, joined
        for name in PUBLISHED:
            assert row[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-5), name


def signal_corpus(tmp_path, n=30):
    records = [{"id": f"d{i}", "lang": "xy"[i % 3 == 0], "text": " ".join(PROSE[(i + k) % len(PROSE)] for k in range(1 + i % 6))} for i in range(n)]
    return write_jsonl(tmp_path / "corpus.jsonl", records)


def test_the_summary_gives_each_signals_mean_and_bootstrap_interval(tiny_llama, tmp_path):
    data = signal_corpus(tmp_path)
    out = tmp_path / "run"
    done = CliRunner().invoke(cli, ["run", "--model", tiny_llama, "--data", data, "--window", "32", "--signals", "--min-k", "0.1", "--bootstrap-samples", str(SAMPLES),
                                    "--group-by", "lang", "-o", str(out)])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "signals (k 0.1, means over documents)  Min-K% " in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]
    signals = summary["signals"]
    assert signals["k"] == 0.1 and "reference_ratio" not in signals and "reference_ratio" not in rows[0]
    weights = poisson_weights_by_hand(0, SAMPLES, len(rows), max(1, BOOTSTRAP_ELEMENTS // SAMPLES))  # [B, n], the corpus's
    for name in PUBLISHED:
        values = np.array([r[name] for r in rows])
        assert signals[name]["documents"] == len(rows)
        assert signals[name]["mean"] == pytest.approx(values.mean(), rel=1e-12)
        assert (signals[name]["min"], signals[name]["max"]) == (values.min(), values.max())
        resampled = weights @ values / weights.sum(axis=1)
        assert signals[name]["bootstrap"] == pytest.approx(list(np.percentile(resampled, [2.5, 97.5])), rel=1e-9)
        for group in ("x", "y"):  # each group's mean and interval, with the corpus's weights
            member = np.array([r["group"] == group for r in rows])
            w = weights[:, member]
            drawn = w.sum(axis=1) > 0
            got = summary["groups"][group]["signals"][name]
            assert got["mean"] == pytest.approx(values[member].mean(), rel=1e-12)
            expected = np.percentile((w @ values[member])[drawn] / w.sum(axis=1)[drawn], [2.5, 97.5])
            assert got["bootstrap"] == pytest.approx(list(expected), rel=1e-9)
    header = (out / "documents.csv").read_text().splitlines()[0].split(",")
    assert header[-4:] == list(PUBLISHED)


@pytest.mark.parametrize("convention", ["sliding", "hf-recipe", "lm-eval", "llama-cpp"])
def test_every_convention_agrees_with_its_saved_tokens(tiny_llama, tmp_path, convention):
    import pyarrow.parquet as pq

    data = signal_corpus(tmp_path, n=40)
    out = tmp_path / convention
    args = ["run", "-q", "--model", tiny_llama, "--data", data, "--window", "32", "--convention", convention, "--signals", "--min-k", "0.25", "--save-tokens", "-o", str(out)]
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0, done.output
    tokens = pq.read_table(out / "tokens").to_pandas()
    rows = [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]
    for row in rows:
        t = tokens[tokens["index"] == row["index"]]
        length = max(1, int(len(t) * 0.25))
        assert len(t) == row["tokens"]
        assert row["min_k"] == pytest.approx(np.sort(t["logprob"].to_numpy(np.float64))[:length].mean(), rel=1e-5)
        assert row["min_k_plus_plus"] == pytest.approx(np.sort(t["z"].to_numpy(np.float64))[:length].mean(), rel=1e-5)
        assert row["mean_entropy"] == pytest.approx(t["entropy"].to_numpy(np.float64).mean(), rel=1e-5)


def args_for(model, data, out, *extra):
    return ["run", "-q", "--model", model, "--data", data, "--window", "24", "--signals", "-o", str(out), *extra]


def test_shards_merge_resume_and_torchrun_give_the_same_signals(tiny_llama, tmp_path):
    data = signal_corpus(tmp_path)
    whole = tmp_path / "whole"
    assert CliRunner().invoke(cli, args_for(tiny_llama, data, whole)).exit_code == 0
    reference = (whole / "documents.jsonl").read_text()
    summary = json.loads((whole / "summary.json").read_text())

    for i in range(3):
        assert CliRunner().invoke(cli, args_for(tiny_llama, data, tmp_path / f"s{i}", "--shard", f"{i}/3")).exit_code == 0
    merged = CliRunner().invoke(cli, ["merge", *(str(tmp_path / f"s{i}") for i in range(3)), "-o", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    assert (tmp_path / "merged" / "documents.jsonl").read_text() == reference
    assert json.loads((tmp_path / "merged" / "summary.json").read_text())["signals"] == summary["signals"]

    cut = tmp_path / "cut"  # a run stopped after 7 documents
    shutil.copytree(whole, cut)
    (cut / "documents.jsonl").write_text("".join(reference.splitlines(keepends=True)[:7]))
    for name in ("summary.json", "documents.csv"):
        (cut / name).unlink()
    assert CliRunner().invoke(cli, args_for(tiny_llama, data, cut)).exit_code == 0
    assert (cut / "documents.jsonl").read_text() == reference
    assert json.loads((cut / "summary.json").read_text())["signals"] == summary["signals"]

    other = CliRunner().invoke(cli, args_for(tiny_llama, data, cut, "--min-k", "0.5"))  # resuming with another k would mix two definitions
    assert other.exit_code != 0 and "min_k" in other.stderr

    ranks = tmp_path / "ranks"
    port = str(29500 + uuid.uuid4().int % 2000)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port, "-m", "ppl_cli", "--", *args_for(tiny_llama, data, ranks)]  # --: torchrun would take --signals for its --signals-to-handle
    done = subprocess.run(torchrun, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    for got, want in zip((ranks / "documents.jsonl").read_text().splitlines(), reference.splitlines()):
        got, want = json.loads(got), json.loads(want)
        assert got.keys() == want.keys()
        for name in PUBLISHED:
            assert got[name] == pytest.approx(want[name], rel=1e-5)


def test_compare_pairs_each_signal(tiny_llama, tiny_llama_64, tmp_path):
    data = signal_corpus(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    assert CliRunner().invoke(cli, args_for(tiny_llama, data, a)).exit_code == 0
    assert CliRunner().invoke(cli, args_for(tiny_llama_64, data, b)).exit_code == 0
    report = json.loads(CliRunner().invoke(cli, ["compare", str(a), str(b), "--json", "--bootstrap-samples", str(SAMPLES)]).stdout)
    rows_a = [json.loads(line) for line in (a / "documents.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (b / "documents.jsonl").read_text().splitlines()]
    weights = poisson_weights_by_hand(0, SAMPLES, len(rows_a), max(1, BOOTSTRAP_ELEMENTS // SAMPLES))
    assert set(report["signals"]) == set(PUBLISHED)
    for name in PUBLISHED:
        va, vb = np.array([r[name] for r in rows_a]), np.array([r[name] for r in rows_b])
        m = report["signals"][name]
        assert (m["a"], m["b"], m["documents"]) == (pytest.approx(va.mean(), rel=1e-12), pytest.approx(vb.mean(), rel=1e-12), len(rows_a))
        deltas = weights @ (vb - va) / weights.sum(axis=1)
        assert m["ci"] == pytest.approx(list(np.percentile(deltas, [2.5, 97.5])), rel=1e-9, abs=1e-12)
        expected_p = (1 + np.count_nonzero(np.abs(deltas - deltas.mean()) >= abs(vb.mean() - va.mean()))) / (1 + SAMPLES)
        assert m["p_value"] == pytest.approx(expected_p)
    text = CliRunner().invoke(cli, ["compare", str(a), str(b)]).stdout
    assert "min_k_plus_plus" in text and "(mean over documents)" in text
    markdown = CliRunner().invoke(cli, ["compare", str(a), str(b), "--markdown"]).stdout
    assert "| zlib_ratio (mean) |" in markdown


def test_select_and_report_take_the_signals(tiny_llama, tmp_path):
    data = signal_corpus(tmp_path, n=40)
    run = tmp_path / "run"
    assert CliRunner().invoke(cli, args_for(tiny_llama, data, run)).exit_code == 0
    rows = [json.loads(line) for line in (run / "documents.jsonl").read_text().splitlines()]

    seen = tmp_path / "likely-seen.jsonl"
    done = CliRunner().invoke(cli, ["select", str(run), "--metric", "min_k_plus_plus", "--keep", "high", "--keep-fraction", "0.25", "-o", str(seen)])
    assert done.exit_code == 0, done.output
    highest = sorted(rows, key=lambda r: (r["min_k_plus_plus"], r["index"]))[-10:]  # ranked ascending, ties by index
    kept = [json.loads(line) for line in seen.read_text().splitlines()]
    assert sorted(r["ppl_eval"]["id"] for r in kept) == sorted(r["id"] for r in highest)
    assert all(r["ppl_eval"]["min_k_plus_plus"] == next(h for h in rows if h["id"] == r["ppl_eval"]["id"])["min_k_plus_plus"] for r in kept)

    recipe = CliRunner().invoke(cli, ["select", str(run), "--config", str(ROOT / "configs" / "select" / "likely-seen.yaml"), "-o", "-"])
    assert recipe.exit_code == 0, recipe.output  # 5% of 40: the 2 highest
    assert sorted(json.loads(line)["ppl_eval"]["id"] for line in recipe.stdout.splitlines()) == sorted(r["id"] for r in highest[-2:])

    cut = float(np.median([r["zlib_ratio"] for r in rows]))
    low = tmp_path / "low.jsonl"
    assert CliRunner().invoke(cli, ["select", str(run), "--metric", "zlib_ratio", "--max", str(cut), "-o", str(low)]).exit_code == 0
    assert sorted(json.loads(line)["ppl_eval"]["id"] for line in low.read_text().splitlines()) == sorted(r["id"] for r in rows if r["zlib_ratio"] <= cut)

    plain = tmp_path / "plain"
    assert CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama, "--data", data, "--window", "24", "-o", str(plain)]).exit_code == 0
    refused = CliRunner().invoke(cli, ["select", str(plain), "--metric", "min_k", "--min", "-5"])
    assert refused.exit_code == 3 and "a run with --signals has it" in refused.stderr
    refused = CliRunner().invoke(cli, ["select", str(run), "--metric", "reference_ratio", "--max", "1"])
    assert refused.exit_code == 3 and "--reference-model" in refused.stderr

    page = tmp_path / "report.html"
    shown = CliRunner().invoke(cli, ["report", str(run), str(plain), "-o", str(page)])
    assert shown.exit_code == 0, shown.output
    html = page.read_text()
    for name in PUBLISHED:
        assert f"<figure class='plot' id='signal_{name}'><svg" in html
    assert "Membership and uncertainty signals" in html and "min_k_plus_plus (mean, 95% interval)" in html


@pytest.mark.parametrize(
    "options,message",
    [
        ({"signals": True, "min_k": 0.0}, "min_k is a share of the tokens in (0, 1], not 0.0"),
        ({"signals": True, "min_k": 1.5}, "min_k is a share of the tokens in (0, 1]"),
        ({"min_k": 0.1}, "min_k sets k of the Min-K% signals: it needs signals=True"),
    ],
)
def test_bad_signal_options_are_one_line(options, message):
    with pytest.raises(PplError, match=re.escape(message)):
        Config(**options)


def test_auroc_by_hand():
    sys.path.insert(0, str(ROOT / "scripts"))
    from signals_auroc import auroc

    assert auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auroc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert auroc(np.array([1.0, 3.0]), np.array([1.0, 2.0])) == (0.5 + 0 + 1 + 1) / 4  # a tie counts half


def test_min_k_plus_plus_tells_members_from_non_members(tiny_llama_64, tmp_path):
    """scripts/signals_auroc.py in small: a tiny model trained on half of some made-up sentences."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from signals_auroc import main

    rng = np.random.default_rng(0)
    words = [w for line in PROSE for w in line.split()]
    lines = [" ".join(rng.choice(words, 12)) for _ in range(200)]
    data = tmp_path / "lines.txt"
    data.write_text("\n".join(lines) + "\n")
    report = main(["--model", tiny_llama_64, "--data", str(data), "--documents", "24", "--words", "12", "--epochs", "20", "--batch", "8", "--lr", "3e-3",
                   "--window", "64", "--bootstrap", "200"])  # fmt: skip
    assert report["members"] == report["non_members"] == 24
    assert report["signals"]["min_k_plus_plus"]["ci"][0] > 0.5
    assert set(report["signals"]) == {"token_perplexity", *SIGNALS}
