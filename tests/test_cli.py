"""Every command through click's CliRunner (or a subprocess where a real process matters)."""

import csv
import json
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ppl_cli.cli import cli


def invoke(*args, input=None):
    return CliRunner().invoke(cli, ["run", "--quiet", *args], input=input)


def test_json_output_parses_and_holds_the_metrics(tiny_gpt2, corpus_jsonl):
    result = invoke("--model", tiny_gpt2, "--data", corpus_jsonl, "--window", "64", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    for key in ("nll_sum", "tokens", "token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert isinstance(summary[key], (int, float))
    assert summary["documents"] == 9 and summary["skipped_documents"] == 0
    assert summary["config"]["window"] == 64 and summary["windowing"] == {"convention": "sliding", "window": 64, "stride": 32, "step": 32, "add_bos": True,
                                                                      "bos_token": {"id": 0, "text": "<|endoftext|>"}}  # fmt: skip
    assert summary["model"]["device"] == "cpu" and summary["model"]["dtype"] == "float32"
    assert re.fullmatch(r"sha256-sum:[0-9a-f]{64}", summary["data"]["fingerprint"])
    assert summary["versions"]["torch"] and summary["tokens_per_second"] > 0
    low, high = summary["bootstrap"]["token_perplexity"]
    assert low <= summary["token_perplexity"] <= high


def test_output_directory_files(tiny_gpt2, corpus_jsonl, tmp_path):
    out = tmp_path / "results" / "run1"
    result = invoke("--model", tiny_gpt2, "--data", corpus_jsonl, "--window", "64", "--id-field", "id", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "token perplexity" in result.stdout and str(out) in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    lines = [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]
    assert [d["index"] for d in lines] == list(range(9))
    assert [d["id"] for d in lines] == [f"doc{i}" for i in range(9)]
    assert sum(d["tokens"] for d in lines) == summary["tokens"]
    rows = list(csv.DictReader((out / "documents.csv").open()))
    assert len(rows) == 9 and float(rows[3]["nll_sum"]) == pytest.approx(lines[3]["nll_sum"])
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_stdin_plain_text_and_jsonl(tiny_gpt2):
    plain = invoke("--model", tiny_gpt2, "--data", "-", "--json", input="Some text.\nMore text.\n")
    assert plain.exit_code == 0, plain.output
    assert json.loads(plain.stdout)["documents"] == 1
    jsonl = invoke("--model", tiny_gpt2, "--data", "-", "--json", input='{"text": "a b c"}\n{"text": "d e"}\n')
    assert json.loads(jsonl.stdout)["documents"] == 2


def test_empty_documents_are_skipped_and_counted(tiny_gpt2):
    text = '{"text": "hello there"}\n{"text": "   "}\n{"text": ""}\n{"text": "again"}\n'
    result = invoke("--model", tiny_gpt2, "--data", "-", "--json", input=text)
    summary = json.loads(result.stdout)
    assert summary["documents"] == 2 and summary["skipped_documents"] == 2


def test_config_file_with_cli_override(tiny_gpt2, corpus_jsonl, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tiny_gpt2}\ndata: {corpus_jsonl}\nwindow: 32\nstride: 8\nlimit: 3\n")
    summary = json.loads(invoke("--config", str(config), "--stride", "16", "--json").stdout)
    assert summary["config"]["window"] == 32 and summary["config"]["stride"] == 16 and summary["documents"] == 3


def test_resume_continues_and_refuses_a_different_run(tiny_gpt2, corpus_jsonl, tmp_path):
    out = tmp_path / "out"
    args = ["--model", tiny_gpt2, "--data", corpus_jsonl, "--window", "32", "--max-batch-tokens", "32", "-o", str(out)]
    assert invoke(*args).exit_code == 0
    full = (out / "documents.jsonl").read_text().splitlines()
    # As if killed mid-run: no summary, four documents done, the fifth line torn.
    (out / "summary.json").unlink()
    (out / "documents.jsonl").write_text("\n".join(full[:4]) + "\n" + full[4][:10])
    assert invoke(*args).exit_code == 0
    assert (out / "documents.jsonl").read_text().splitlines() == full
    assert (out / "summary.json").exists()

    other = invoke(*args[:-2], "--window", "48", "-o", str(out))
    assert other.exit_code == 5
    assert "different window (32, now 48)" in other.stderr and "--overwrite" in other.stderr
    assert invoke(*args[:-2], "--window", "48", "-o", str(out), "--overwrite").exit_code == 0


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--data", "missing.jsonl"], 3, "data not found: missing.jsonl"),
        (["--data", "{corpus}", "--window", "4096"], 2, "--window 4096 is longer than the model's context length (128); --allow-beyond-context scores it anyway"),
        (["--data", "{corpus}", "--stride", "0"], 2, "stride must be at least 1"),
        (["--data", "{corpus}", "--limit", "0"], 2, "limit must be at least 1"),
        (["--data", "{corpus}", "--text-field", "body"], 3, "has no field 'body' (fields: id, text)"),
        (["--data", "{corpus}", "--device", "cuda"], 2, "torch sees no CUDA GPU"),
        (["--data", "{corpus}", "--device", "tpu9"], 2, "unknown device"),
        (["--data", "{corpus}", "--config", "nope.yaml"], 2, "config file not found: nope.yaml"),
    ],
)
def test_bad_input_is_one_line_and_an_exit_code(tiny_gpt2, corpus_jsonl, args, code, message):
    args = [a.replace("{corpus}", corpus_jsonl) for a in args]
    result = invoke("--model", tiny_gpt2, *args)
    assert result.exit_code == code, result.output
    assert result.stderr.strip().splitlines() == [f"ppl-eval: error: {result.stderr.split('error: ', 1)[1].strip()}"]
    assert message in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "model,message",
    [
        ("./no-such-dir", "model directory not found: ./no-such-dir"),
        ("missing.gguf", "model file not found: missing.gguf"),
        ("someone/no-such-model", "not in the local Hugging Face cache"),  # HF_HUB_OFFLINE=1 in tests
    ],
)
def test_bad_models(model, message):
    result = invoke("--model", model, "--data", "-", input="text")
    assert result.exit_code == 4, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_models_that_are_not_causal_lms_are_refused(tmp_path):
    from transformers import BertConfig, BertModel, T5Config, T5Model

    # T5: transformers has no causal-LM class for it. BERT: it has one, but without is_decoder
    # attention is bidirectional, so later tokens leak into every prediction.
    T5Model(T5Config(d_model=16, d_ff=16, num_layers=1, num_heads=2, d_kv=8, vocab_size=100)).save_pretrained(tmp_path / "t5")
    bert = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    BertModel(bert).save_pretrained(tmp_path / "bert")
    for name in ("t5", "bert"):
        write_tokenizer(tmp_path / name)
        result = invoke("--model", str(tmp_path / name), "--data", "-", input="text")
        assert result.exit_code == 4, result.output
        assert "is not a causal" in result.stderr and "Traceback" not in result.output


def write_tokenizer(path):
    from conftest import train_tokenizer
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(["<s>"], vocab_size=300), bos_token="<s>").save_pretrained(path)


def test_unwritable_output(tiny_gpt2, corpus_jsonl, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = invoke("--model", tiny_gpt2, "--data", corpus_jsonl, "-o", str(blocker / "sub"))
    assert result.exit_code == 5 and "is not writable" in result.stderr


def test_help_is_instant_without_heavy_imports():
    code = "import sys, ppl_cli.cli; print(sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    help_text = subprocess.run([sys.executable, "-m", "ppl_cli", "run", "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "--window" in help_text.stdout


@pytest.mark.parametrize("slowdown,warned", [(60.0, True), (0.25, False)])
def test_half_precision_on_a_cpu_without_fast_matmul_warns_in_one_line(tiny_gpt2, monkeypatch, slowdown, warned):
    import ppl_cli.engine.loading

    monkeypatch.setattr(ppl_cli.engine.loading, "half_matmul_slowdown", lambda dtype: slowdown)
    result = invoke("--model", tiny_gpt2, "--data", "-", "--dtype", "bfloat16", "--json", input="some words to score\n")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"]["dtype"] == "bfloat16"  # the run goes on, as asked
    lines = [line for line in result.stderr.splitlines() if line.startswith("ppl-eval: warning:")]
    if warned:
        assert lines == ["ppl-eval: warning: this CPU multiplies bfloat16 matrices 60x slower than float32 (no AVX512-BF16 or AMX); --dtype float32 is faster here, and exact"]
    else:
        assert lines == []


def test_half_matmul_slowdown_is_a_timing_ratio():
    import torch

    from ppl_cli.engine.loading import half_matmul_slowdown

    assert 0 < half_matmul_slowdown(torch.bfloat16) < 10_000
