"""Kills, signals, hostile input and numeric faults: nothing finished is lost, nothing wrong is reported."""

import json
import math
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import PROSE, lines, run_until
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ppl_cli import Config, evaluate
from ppl_cli.cli import cli
from ppl_cli.engine.base import Job
from ppl_cli.engine.transformers_engine import TransformersEngine
from ppl_cli.errors import PplError


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory):
    """60 documents of 1-12 sentences: enough batches to be killed in the middle of."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("long") / "long.jsonl"
    rows = [{"text": " ".join(rng.choice(PROSE) for _ in range(rng.randint(1, 12)))} for _ in range(60)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def command(model, data, out, *extra):
    return [sys.executable, "-m", "ppl_cli", "run", "--model", model, "--data", data, "--window", "16",
            "--max-batch-tokens", "16", "-o", str(out), "--quiet", *extra]  # fmt: skip


def comparable(summary):
    """A summary minus what differs between any two runs (timings, and the output path)."""
    drop = {"wall_time_s", "scoring_time_s", "tokens_per_second"}
    summary = {k: v for k, v in summary.items() if k not in drop}
    summary["config"] = {k: v for k, v in summary["config"].items() if k not in ("output", "overwrite")}
    return summary


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, long_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "reference"
    subprocess.run(command(tiny_llama, long_corpus, out), check=True)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_a_random_moment_then_resume_equals_an_uninterrupted_run(
    tiny_llama, long_corpus, tmp_path, uninterrupted, seed
):
    out = tmp_path / f"killed-{seed}"
    killed = run_until(command(tiny_llama, long_corpus, out), out, random.Random(seed).randint(1, 50), signal.SIGKILL)
    assert killed.returncode in (-signal.SIGKILL, 0)
    assert not (out / "summary.json").exists() or killed.returncode == 0
    subprocess.run(command(tiny_llama, long_corpus, out), check=True)
    # Bit-for-bit: same machine, same batch plan.
    assert lines(out / "documents.jsonl") == lines(uninterrupted / "documents.jsonl")
    assert (out / "documents.csv").read_text() == (uninterrupted / "documents.csv").read_text()
    resumed = json.loads((out / "summary.json").read_text())
    assert comparable(resumed) == comparable(json.loads((uninterrupted / "summary.json").read_text()))


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_stop_cleanly_and_say_how_to_resume(tiny_llama, long_corpus, tmp_path, uninterrupted, sig, code):
    out = tmp_path / "stopped"
    proc = run_until(command(tiny_llama, long_corpus, out), out, 2, sig)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    stderr = proc.stderr.read()
    assert proc.returncode == code, stderr
    assert f"stopped by {signal.Signals(sig).name}" in stderr and "run the same command to resume" in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    saved = lines(out / "documents.jsonl")
    assert saved and all(json.loads(line) for line in saved)  # whole lines only
    subprocess.run(command(tiny_llama, long_corpus, out), check=True)
    assert lines(out / "documents.jsonl") == lines(uninterrupted / "documents.jsonl")


def test_remote_code_is_never_run_without_the_flag(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "custom-thing", "auto_map": {"AutoConfig": "configuration_x.XConfig"}})
    )
    marker = tmp_path / "executed"
    (tmp_path / "configuration_x.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    result = CliRunner().invoke(cli, ["run", "--quiet", "--model", str(tmp_path), "--data", "-"], input="text")
    assert result.exit_code == 4
    assert "contains custom code; rerun with --trust-remote-code" in result.stderr
    assert not marker.exists()


def test_gguf_of_an_unsupported_architecture(tmp_path):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "mamba9")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = CliRunner().invoke(cli, ["run", "--model", str(tmp_path / "odd.gguf"), "--data", "-"], input="text")
    assert result.exit_code == 4
    assert "architecture mamba9 is not supported" in result.stderr and "Traceback" not in result.output


def test_pickled_weights_are_refused_unless_allowed(tiny_gpt2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pickled = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    state = model.state_dict()
    pickled.mkdir()
    model.config.save_pretrained(pickled)
    AutoTokenizer.from_pretrained(tiny_gpt2).save_pretrained(pickled)
    torch.save(state, pickled / "pytorch_model.bin")
    args = ["run", "--quiet", "--model", str(pickled), "--data", "-", "--json"]
    refused = CliRunner().invoke(cli, args, input="some text here")
    assert refused.exit_code == 4
    assert "pickled weights (pytorch_model.bin)" in refused.stderr and "--allow-pickle" in refused.stderr
    allowed = CliRunner().invoke(cli, [*args, "--allow-pickle"], input="some text here")
    assert allowed.exit_code == 0, allowed.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--overwrite"], "--overwrite needs an output directory"),
        (["--data", "{corpus}", "--split", "train"], "--split applies to hub datasets"),
        (["--data", "{corpus}", "--data-config", "en"], "--data-config applies to hub datasets"),
        (["--data", "{corpus}", "--doc-split", "line"], "--doc-split applies to plain text"),
        (["--data", "wikitext", "--doc-split", "line"], "--doc-split applies to plain text"),
        (["--data", "-", "--no-add-bos", "--add-bos", "--window", "1"], "window must be at least 2"),
    ],
)
def test_conflicting_options(tiny_gpt2, corpus_jsonl, args, message):
    args = [a.replace("{corpus}", corpus_jsonl) for a in args]
    result = CliRunner().invoke(cli, ["run", "--quiet", "--model", tiny_gpt2, *args], input="x")
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_non_finite_log_probability_stops_the_run(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float16).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1e4)  # logits far beyond float16's 65,504
    scorer = TransformersEngine(model, torch.device("cpu"), 64)
    with pytest.raises(PplError, match="non-finite log-probability in float16") as e:
        scorer.score([Job(torch.arange(2, 20), 1, 18)])
    assert e.value.exit_code == 6


def test_out_of_memory_halves_the_batch_and_changes_nothing(tiny_llama, corpus_jsonl, monkeypatch):
    expected = evaluate(Config(model=tiny_llama, data=corpus_jsonl, window=32, max_batch_tokens=1024)).documents
    real_forward = TransformersEngine.forward
    sizes = []

    def forward_with_small_memory(self, jobs):
        sizes.append(len(jobs))
        if len(jobs) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(self, jobs)

    monkeypatch.setattr(TransformersEngine, "forward", forward_with_small_memory)
    got = evaluate(Config(model=tiny_llama, data=corpus_jsonl, window=32, max_batch_tokens=1024)).documents
    assert max(sizes) > 3 and sizes[-1] <= 3
    for a, b in zip(expected, got):
        assert b["nll_sum"] == pytest.approx(a["nll_sum"], rel=1e-5)


ODD_TEXT = st.one_of(
    st.text(max_size=300),
    st.sampled_from(["", " ", "\x00", "a\x00b", "e\u0301\u0301\u0301", "\u202eright-to-left\u202c", "\ufeff", "🙂" * 40]),
    st.binary(max_size=300).map(lambda b: b.decode("utf-8", errors="replace")),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(ODD_TEXT, min_size=1, max_size=6))
@example(texts=["\U00010000" * 16 + "\U0001f3c0" + "\U0001f640" * 13])  # one "word": word perplexity beyond float64
def test_fuzz_odd_documents_finish_or_fail_cleanly(tiny_gpt2, texts):
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    result = CliRunner().invoke(cli, ["run", "--quiet", "--model", tiny_gpt2, "--data", "-", "--json"], input=data)
    if result.exit_code != 0:
        assert result.exit_code in (2, 3) and "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) == 1
        return
    summary = json.loads(result.stdout)
    assert summary["documents"] + summary["skipped_documents"] == len(texts)
    assert math.isfinite(summary["nll_sum"]) and math.isfinite(summary["bits_per_byte"] or 0)
    for key, units in (("token_perplexity", "tokens"), ("word_perplexity", "words"), ("byte_perplexity", "bytes")):
        if summary[units] == 0:
            assert summary[key] is None
        elif summary["nll_sum"] / summary[units] < 709:
            assert math.isfinite(summary[key])
        else:  # beyond float64, e.g. one long "word" of emoji under a random model: documented as Infinity
            assert summary[key] == math.inf


def test_fuzz_raw_bytes_on_stdin(tiny_gpt2):
    rng = random.Random(5)
    for size in (0, 1, 17, 5000):
        raw = bytes(rng.randrange(256) for _ in range(size))
        result = CliRunner().invoke(cli, ["run", "--quiet", "--model", tiny_gpt2, "--data", "-", "--json"], input=raw)
        assert result.exit_code in (0, 3), result.output
        assert "Traceback" not in result.output
        if result.exit_code == 3:
            assert "not valid UTF-8" in result.stderr or "no documents" in result.stderr


def test_a_one_megabyte_single_line_document(tiny_gpt2, tmp_path):
    path = tmp_path / "big.txt"
    path.write_text(("word " * 200_000)[:1_000_000])
    result = CliRunner().invoke(cli, ["run", "--quiet", "--model", tiny_gpt2, "--data", str(path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["bytes"] == 1_000_000 and math.isfinite(summary["token_perplexity"])


def test_environment_is_isolated():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
