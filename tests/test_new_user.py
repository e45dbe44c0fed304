"""What a new user tripped over: errors that say what to do, statistics from a handful of documents,
the start token in sight, a quick Ctrl-C, quiet loading, the report's details, the Python API's
own names, and the small ones. Each test fails on the code before its fix."""

import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import PROSE, lines
from ppl_cli import Config, PplError, PplWarning, evaluate, score
from ppl_cli.cli import cli


def write(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"id": f"d{k}", "text": t}) + "\n" for k, t in enumerate(texts)))
    return str(path)


def cli_run(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ppl_cli", "run", *args], capture_output=True, text=True, timeout=timeout, env=env)


# 1. --lengths over documents that are all too short


def test_lengths_over_short_documents_say_so_before_the_model_loads(tiny_llama, tmp_path, monkeypatch):
    import ppl_cli.engine.loading

    data = write(tmp_path / "paras.jsonl", [" ".join(PROSE[: k + 1]) for k in range(4)])
    monkeypatch.setattr(ppl_cli.engine.loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(PplError) as caught:
        evaluate(Config(model=tiny_llama, data=data, lengths=(128, 256), allow_beyond_context=True))
    message = str(caught.value)
    longest = int(re.search(r"the longest (\d+) tokens", message).group(1))
    assert "4 documents are shorter than the largest length, 256 tokens" in message and "choose --lengths" not in message
    assert "min_tokens 128" in message or longest < 128  # the API's own names
    done = CliRunner().invoke(cli, ["run", "--model", tiny_llama, "--data", data, "--lengths", "8,200", "--allow-beyond-context"])
    assert done.exit_code == 3 and "--min-tokens 8 scores each document of at least 8 tokens" in done.output, done.output


def test_merge_says_the_same_of_shards_of_short_documents(tiny_llama, tmp_path):
    data = write(tmp_path / "paras.jsonl", [" ".join(PROSE[: k + 1]) for k in range(4)])
    for shard in ("0/2", "1/2"):
        done = CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama, "--data", data, "--lengths", "8,200", "--shard", shard, "-o", str(tmp_path / shard[0])])
        assert done.exit_code == 0, done.output
    merged = CliRunner().invoke(cli, ["merge", str(tmp_path / "0"), str(tmp_path / "1"), "-o", str(tmp_path / "m")])
    assert merged.exit_code == 3 and "4 documents are shorter than the largest length, 200 tokens" in merged.output and "--min-tokens 8" in merged.output, merged.output


# 2. the report's documents, each once


def test_the_report_lists_each_document_once(tiny_llama, tmp_path):
    """Three documents and five of each kind asked for: the two most surprising, then the least, each once."""
    data = write(tmp_path / "c.jsonl", PROSE[:3])
    assert CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama, "--data", data, "-o", str(tmp_path / "r")]).exit_code == 0
    made = CliRunner().invoke(cli, ["report", str(tmp_path / "r"), "-o", str(tmp_path / "r.html")])
    assert made.exit_code == 0, made.output
    headings = re.findall(r"<h3>(most|least) surprising: (d\d) ", (tmp_path / "r.html").read_text())
    assert sorted(d for _, d in headings) == ["d0", "d1", "d2"] and [k for k, _ in headings] == ["most", "most", "least"]
    rows = {json.loads(line)["id"]: json.loads(line)["token_perplexity"] for line in lines(tmp_path / "r" / "documents.jsonl")}
    ranked = sorted(rows, key=rows.get, reverse=True)
    assert [d for _, d in headings] == ranked[:2] + ranked[2:]


# 3. statistics from a handful of documents


def write_run(path, nll, tokens):
    from ppl_cli.output.metrics import unit_metrics

    path.mkdir(parents=True)
    rows = [{"index": i, "id": f"d{i}", **unit_metrics(float(a), int(t), int(t), int(4 * t))} for i, (a, t) in enumerate(zip(nll, tokens))]
    (path / "documents.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"documents": len(rows), "windowing": {"convention": "sliding", "window": 32, "stride": 16, "add_bos": True},
               "data": {"fingerprint": "sha256-sum:" + "0" * 64}}  # fmt: skip
    (path / "summary.json").write_text(json.dumps(summary))
    return str(path)


def exact_sign_flip(a_nll, b_nll, tokens) -> float:
    """The paired sign-flip test by enumeration: each document's two runs swapped or not."""
    observed = abs(math.exp(b_nll.sum() / tokens.sum()) - math.exp(a_nll.sum() / tokens.sum()))
    at_least = 0
    patterns = list(itertools.product([False, True], repeat=len(tokens)))
    for swap in patterns:
        a = sum(b if s else x for s, x, b in zip(swap, a_nll, b_nll))
        b = sum(x if s else b for s, x, b in zip(swap, a_nll, b_nll))
        at_least += abs(math.exp(b / tokens.sum()) - math.exp(a / tokens.sum())) >= observed * (1 - 1e-12)
    return at_least / len(patterns)


@pytest.mark.parametrize("n", [1, 3, 7])
def test_few_documents_get_the_exact_paired_test(n, tmp_path):
    rng = np.random.default_rng(n)
    tokens = rng.integers(40, 90, n)
    a_nll = tokens * rng.uniform(2.0, 3.0, n)
    b_nll = a_nll * 0.9  # better on every document
    a, b = write_run(tmp_path / "a", a_nll, tokens), write_run(tmp_path / "b", b_nll, tokens)
    done = CliRunner().invoke(cli, ["compare", a, b, "--json"])
    m = json.loads(done.output)["token_perplexity"]
    assert m["p_value"] == pytest.approx(exact_sign_flip(a_nll, b_nll, tokens), rel=1e-12)
    assert m["p_value"] == pytest.approx(2 / 2**n) and m["test"] == "exact sign-flip permutation" and m["documents"] == n
    text = CliRunner().invoke(cli, ["compare", a, b]).output
    if n == 1:
        assert m["ci"] is None and "95% CI n/a (one document)" in text
    assert f"p = {2 / 2**n:.4f} (exact, {n} document{'s' * (n != 1)})" in text


def test_many_documents_keep_the_bootstrap(tmp_path):
    tokens = np.full(20, 50)
    a = write_run(tmp_path / "a", tokens * 2.5, tokens)
    b = write_run(tmp_path / "b", tokens * 2.4, tokens)
    m = json.loads(CliRunner().invoke(cli, ["compare", a, b, "--json"]).output)["token_perplexity"]
    assert m["test"] == "paired bootstrap" and m["documents"] == 20 and m["p_value"] == pytest.approx(1 / 1001)


def test_a_one_document_run_has_no_interval_and_says_why(tiny_llama, tmp_path):
    data = write(tmp_path / "one.jsonl", [" ".join(PROSE)])
    done = CliRunner().invoke(cli, ["run", "--model", tiny_llama, "--data", data, "--json"])
    summary = json.loads(done.stdout)
    assert summary["bootstrap"]["token_perplexity"] is None and summary["bootstrap"]["missing"] == "one document"
    text = CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama, "--data", data]).output
    assert "(95% CI n/a: one document)" in text
    three = write(tmp_path / "three.jsonl", PROSE[:3])
    text = CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama, "--data", three]).output
    assert re.search(r"95% CI [\d.]+ - [\d.]+, 3 documents\)", text), text


def test_the_mean_document_perplexity_interval_is_its_own_statistic():
    """At each length, the percentile interval of sum w ppl / sum w over the resamples, not token
    perplexity's (with few documents both can share a bound: a resample of one document gives both its value)."""
    from test_compare import poisson_draw

    from ppl_cli.output.metrics import BOOTSTRAP_ELEMENTS, accumulate

    rng = np.random.default_rng(3)
    docs = []
    for i in range(30):
        tokens = [int(t) for t in rng.integers(30, 60, 2)]
        nll = [t * float(rng.uniform(1.5, 4.0)) for t in tokens]
        docs.append({"index": i, "id": str(i), "nll_sum": nll[1], "tokens": tokens[1], "words": 10, "bytes": 100, "token_perplexity": math.exp(nll[1] / tokens[1]),
                     "lengths": {"nll": nll, "tokens": tokens, "bytes": [100, 100], "words": [10, 10]}})  # fmt: skip
    samples = 400
    point = accumulate(docs, samples, 5).metrics()["length_points"][0]
    u = np.random.default_rng(5).integers(0, 2**32, size=(samples, len(docs)), dtype=np.uint32)
    assert len(docs) <= BOOTSTRAP_ELEMENTS // samples  # one chunk: the weights are drawn as one matrix
    weights = np.array([[poisson_draw(int(x)) for x in row] for row in u])
    ppl = np.array([math.exp(d["lengths"]["nll"][0] / d["lengths"]["tokens"][0]) for d in docs])
    nll, tokens = np.array([d["lengths"]["nll"][0] for d in docs]), np.array([d["lengths"]["tokens"][0] for d in docs])
    own = (weights @ ppl) / weights.sum(1)
    micro = np.exp((weights @ nll) / (weights @ tokens))
    assert point["bootstrap"]["mean_document_perplexity"] == pytest.approx(list(np.percentile(own, [2.5, 97.5])), rel=1e-9)
    assert point["bootstrap"]["token_perplexity"] == pytest.approx(list(np.percentile(micro, [2.5, 97.5])), rel=1e-9)
    assert point["bootstrap"]["mean_document_perplexity"] != point["bootstrap"]["token_perplexity"]


# 4. the start token


def test_the_start_token_is_said_recorded_and_chosen(tiny_gpt2, tmp_path):
    data = write(tmp_path / "c.jsonl", PROSE[:3])
    done = CliRunner().invoke(cli, ["run", "--model", tiny_gpt2, "--data", data, "-o", str(tmp_path / "a")])
    assert "each document is scored after the start token '<|endoftext|>' (id 0); the tokenizer's BOS (--bos-token TOKEN" in done.output
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["windowing"]["bos_token"] == {"text": "<|endoftext|>", "id": 0}
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(tiny_gpt2).convert_ids_to_tokens(5)
    chosen = CliRunner().invoke(cli, ["run", "--model", tiny_gpt2, "--data", data, "--bos-token", other, "-o", str(tmp_path / "b")])
    assert chosen.exit_code == 0 and f"start token {other!r} (id 5)" in chosen.output, chosen.output
    a, b = (json.loads(lines(tmp_path / x / "documents.jsonl")[0]) for x in "ab")
    assert a["tokens"] == b["tokens"] and a["nll_sum"] != b["nll_sum"]
    assert json.loads((tmp_path / "b" / "run.json").read_text())["bos_token_id"] == 5
    refused = CliRunner().invoke(cli, ["run", "--model", tiny_gpt2, "--data", data, "--bos-token", other, "--no-add-bos"])
    assert refused.exit_code == 2 and "choose one" in refused.output
    assert "start token" in Path(__file__).resolve().parents[1].joinpath("docs", "words.md").read_text().split("## The words")[0]


# 5. Ctrl-C


def long_corpus(tmp_path) -> str:
    return write(tmp_path / "long.jsonl", [" ".join(PROSE[(k + j) % len(PROSE)] for j in range(40)) for k in range(40)])


@pytest.mark.slow
def test_sigint_is_acknowledged_and_stops_within_a_fraction_of_a_batch(smollm2, tmp_path):
    """SmolLM2 on 2 cores, batches of 4 windows of 512 tokens: the stop waits for the current decoder
    layer or LM-head chunk, not the batch. The time from SIGINT to exit is compared with one batch's."""
    data = long_corpus(tmp_path)
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "ppl_cli", "run", "--data", data, "--window", "512", "--max-batch-tokens", "2048", "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not lines(out / "documents.jsonl"):
        time.sleep(0.02)
    started = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    stopped = time.perf_counter() - started
    assert proc.returncode == 130, stderr[-2000:]
    assert "stopping on SIGINT: saving the documents finished so far" in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("ppl-eval: stopped by SIGINT") and "error" not in last
    batch = time_a_batch(smollm2)
    assert stopped < 0.5 * batch, (stopped, batch)


def time_a_batch(smollm2) -> float:
    """Seconds of one batch of 4 windows of 512 tokens through the transformers engine."""
    import torch

    from ppl_cli.engine.base import Job
    from ppl_cli.engine.transformers_engine import TransformersEngine

    engine = TransformersEngine(smollm2.model, smollm2.device, 2048, tune_memory=False)
    jobs = [Job(torch.arange(100 + k, 612 + k), 256, 512) for k in range(4)]
    engine.score_batch(jobs)
    started = time.perf_counter()
    engine.score_batch(jobs)
    return time.perf_counter() - started


def test_a_stop_after_the_last_document_writes_the_summary(tiny_llama, tmp_path, monkeypatch):
    import ppl_cli.output.rows as rows
    from ppl_cli.runtime.signals import Interrupted

    original = rows.score_stream

    def stopped_at_the_end(*args, **kwargs):
        original(*args, **kwargs)
        raise Interrupted(signal.SIGINT)

    monkeypatch.setattr(rows, "score_stream", stopped_at_the_end)
    data = write(tmp_path / "c.jsonl", PROSE[:4])
    result = evaluate(Config(model=tiny_llama, data=data, output=str(tmp_path / "o")))
    assert result.summary["documents"] == 4 and (tmp_path / "o" / "summary.json").is_file()


def test_a_finished_run_run_again_does_not_load_the_model(tiny_llama, tmp_path, monkeypatch):
    import ppl_cli.engine.loading

    data = write(tmp_path / "c.jsonl", PROSE[:4])
    first = evaluate(Config(model=tiny_llama, data=data, output=str(tmp_path / "o")))
    monkeypatch.setattr(ppl_cli.engine.loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    again = CliRunner().invoke(cli, ["run", "--model", tiny_llama, "--data", data, "-o", str(tmp_path / "o")])
    assert again.exit_code == 0 and "every document is scored already" in again.output
    as_json = CliRunner().invoke(cli, ["run", "--model", tiny_llama, "--data", data, "-o", str(tmp_path / "o"), "--json"])
    assert json.loads(as_json.stdout) == first.summary
    monkeypatch.undo()
    grown = Path(data)
    grown.write_text(grown.read_text() + json.dumps({"id": "d9", "text": PROSE[5]}) + "\n")
    more = evaluate(Config(model=tiny_llama, data=data, output=str(tmp_path / "o")))  # the data grew: scored, not reused
    assert more.summary["documents"] == 5


# 6. a bad record's line names --skip-bad-records


def test_a_bad_record_names_the_option_that_passes_over_it(tiny_llama, tmp_path):
    data = tmp_path / "messy.jsonl"
    data.write_text(json.dumps({"text": "fine"}) + "\nnot json\n")
    done = CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama, "--data", str(data)])
    assert done.exit_code == 3 and "messy.jsonl line 2 is not JSON" in done.output and "--skip-bad-records" in done.output


# 7. the Python API's names and DataFrames


def test_the_python_api_names_its_keywords(tiny_gpt2, tmp_path):
    with pytest.raises(PplError, match=r"save_words=True needs an output directory \(output=DIR\)"):
        score(["A text."], model=tiny_gpt2, save_words=True)
    with pytest.raises(PplError, match=r"min_k sets k of the Min-K% signals: it needs signals=True"):
        Config(min_k=0.3)
    done = CliRunner().invoke(cli, ["run", "--save-words"])
    assert "--save-words needs an output directory (-o/--output)" in done.output  # the CLI keeps its options' names
    with pytest.warns(PplWarning, match=r"^stride 16 is not below window 16: .* windowing\.stride"):  # warnings too
        score(["A text of a few words, long enough for two windows of sixteen tokens each."], model=tiny_gpt2, window=16, stride=16)
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"text": "A text of a few words, long enough for two windows of sixteen tokens each."}) + "\n")
    done = CliRunner().invoke(cli, ["run", "-q", "--model", str(tiny_gpt2), "--data", str(data), "--window", "16", "--stride", "16"])
    assert done.exit_code == 0 and "warning: --stride 16 is not below --window 16" in done.output, done.output
    result = score(["The cat sat on the mat.", "A dog."], model=tiny_gpt2, save_words=True, save_tokens=True, output=str(tmp_path / "o"))
    words, tokens = result.words(), result.tokens()
    assert isinstance(words, pd.DataFrame) and words["word"].tolist() == ["The", "cat", "sat", "on", "the", "mat.", "A", "dog."]
    assert isinstance(tokens, pd.DataFrame) and len(tokens) == sum(r["tokens"] for r in result.documents)
    with pytest.raises(PplError, match="saved no words"):
        score(["A text."], model=tiny_gpt2).words()
    assert "output" in (Path(__file__).resolve().parents[1] / "docs" / "python-api.md").read_text().split("words()")[0]


# 8. other libraries' bars


def test_loading_draws_no_other_librarys_bars_but_with_verbose(tiny_gguf, tmp_path):
    data = write(tmp_path / "c.jsonl", PROSE[:2])
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}  # (an earlier test's --quiet, in this process, set it)
    env["HF_HOME"] = str(tmp_path / "hf")  # a fresh cache: the GGUF file is de-quantized (its bars) and the copy written
    quiet = cli_run("--model", tiny_gguf, "--data", data, env=env)
    assert quiet.returncode == 0, quiet.stderr
    others = [line for line in re.split(r"[\r\n]", quiet.stderr) if "%|" in line and not line.startswith("scoring")]
    assert not others, others
    assert quiet.stderr.startswith("ppl-eval: loading ")
    loud = cli_run("--verbose", "--model", tiny_gguf, "--data", data, env={**env, "HF_HOME": str(tmp_path / "hf2")})
    assert loud.returncode == 0 and "de-quantizing GGUF tensors" in loud.stderr


# 9. the report's details


@pytest.fixture
def length_run(tiny_llama, tmp_path):
    data = write(tmp_path / "l.jsonl", [" ".join(PROSE[(k + j) % len(PROSE)] for j in range(12)) for k in range(3)] + ["Line one.\nLine two.\n\nAfter a blank line."])
    out = tmp_path / "len"
    done = CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama, "--data", data, "--lengths", "16,32,64", "--min-tokens", "16", "-o", str(out)])
    assert done.exit_code == 0, done.output
    return out


def test_the_length_plot_is_log_log_with_plain_ticks(length_run):
    from ppl_cli.commands.report import length_figure, read_run

    fig = length_figure([read_run(length_run)])
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_xscale() == "log"
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert {"16", "32", "64"} <= set(labels) and not any("^" in t for t in labels)


def test_the_histogram_counts_whole_documents_with_plain_ticks(tiny_llama, tmp_path):
    from ppl_cli.commands.report import histogram_figure, read_run, scan

    data = write(tmp_path / "c.jsonl", PROSE[:3])
    CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama, "--data", data, "-o", str(tmp_path / "r")])
    run = read_run(tmp_path / "r")
    fig = histogram_figure([run], [scan(run, 5, {})])
    fig.canvas.draw()
    ax = fig.axes[0]
    assert all(float(t).is_integer() for t in ax.get_yticks())
    assert not any("10^" in t.get_text() or "times" in t.get_text() for t in ax.get_xticklabels())


def test_the_provenance_of_a_length_run_and_the_word_view_keep_what_applies(length_run, tiny_gpt2, tmp_path):
    from ppl_cli.commands.report import windowing_text

    summary = json.loads((length_run / "summary.json").read_text())
    shown = windowing_text(summary["windowing"])
    assert "lengths [16, 32, 64]" in shown and "protocol prefix" in shown and "window" not in shown and "step" not in shown
    assert os.path.isabs(summary["data"]["paths"])
    data = write(tmp_path / "w.jsonl", ["First line here.\nSecond line.\n\nA new paragraph."])
    CliRunner().invoke(cli, ["run", "-q", "--model", tiny_gpt2, "--data", data, "--save-words", "-o", str(tmp_path / "w")])
    CliRunner().invoke(cli, ["report", str(tmp_path / "w"), "-o", str(tmp_path / "w.html")])
    page = (tmp_path / "w.html").read_text()
    words = page[page.index('class="word') - 200 :]
    assert words.count("<br>") == 3  # one line break, then a blank line


# 10. the small ones


def test_help_lists_whole_descriptions_and_points_to_the_docs():
    text = CliRunner().invoke(cli, ["--help"]).output
    commands = text.split("Commands:")[1]
    assert "..." not in commands and "docs/" in commands
    assert "Score documents with a causal LM and report perplexity." in text


def test_lengths_in_k():
    assert Config(lengths="2k,4k,8k").lengths == (2048, 4096, 8192)
    assert Config(lengths="1k:4k:1k").lengths == (1024, 2048, 3072, 4096)


def test_the_readme_says_what_the_demo_scores_and_how_long_it_takes():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert re.search(r"7,196 tokens of 8 documents", readme) and re.search(r"about \d+ s", readme.split("## Examples")[0])


def test_the_progress_bar_stays_within_its_total_after_a_resume_rescores_a_group(tiny_llama, tmp_path, monkeypatch):
    """A kill that leaves a group half-written: the resumed run scores the group again, counting its finished documents once."""
    from conftest import run_until

    from ppl_cli.runtime import progress

    data = long_corpus(tmp_path)
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "ppl_cli", "run", "-q", "--model", tiny_llama, "--data", data, "--window", "32", "--max-batch-tokens", "2000", "-o", str(out)]
    proc = run_until(cmd, out, 1, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL and lines(out / "documents.jsonl")
    seen = []
    original = progress.Progress.close

    def close(self):
        seen.append((self.tokens, self.total()[0]))
        original(self)

    monkeypatch.setattr(progress.Progress, "close", close)
    evaluate(Config(model=tiny_llama, data=data, window=32, max_batch_tokens=2000, output=str(out)), progress=True)
    (tokens, total), = seen
    assert tokens == total
