"""What a new user meets first: rows as documents finish, an honest progress bar, a default model that
starts in seconds, scoring texts from Python, bad records, and the one-line messages."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import PROSE, lines, run_until

import ppl_cli
from ppl_cli import Config, evaluate
from ppl_cli.cli import cli
from ppl_cli.engine.tokenizing import ReadTally
from ppl_cli.errors import PplError
from ppl_cli.output import rows as rows_module
from ppl_cli.output.rows import Flusher
from ppl_cli.runtime.progress import Progress


def write_corpus(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: t}) + "\n" for t in texts))
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "c.jsonl", [" ".join(PROSE[(i + k) % len(PROSE)] for k in range(1 + i % 4)) for i in range(24)])


# --- rows as each document finishes --------------------------------------------------------------


def test_the_flusher_writes_once_the_interval_passed_or_when_the_next_batch_would_hold_rows_past_it():
    now = [0.0]
    flusher = Flusher(interval=2.0, clock=lambda: now[0])
    flusher.timed(1000, 0.1)  # 0.1 ms a padded token
    now[0] = 0.5
    assert not flusher.due(1000)  # 0.5 s waited, the next batch ends at 0.6 s
    assert flusher.due(20_000)  # the next batch would end at 2.5 s: write before it
    now[0] = 2.0
    assert flusher.due(0)
    flusher.wrote()
    assert not flusher.due(1000)


def test_each_row_is_handed_on_as_its_document_finishes(tiny_llama, tmp_path, monkeypatch):
    """With no time to wait for, a document's row is handed on right after the batch that scores its
    last window: here the first document's, after its own windows and before any other's."""
    from transformers import AutoTokenizer

    from ppl_cli.engine.transformers_engine import TransformersEngine
    from ppl_cli.engine.windows import sliding_windows

    texts = [" ".join(PROSE * 2), *(PROSE[k] for k in range(6)), " ".join(PROSE)]
    data = write_corpus(tmp_path / "c.jsonl", texts)
    first_windows = len(sliding_windows(1 + len(AutoTokenizer.from_pretrained(tiny_llama)(texts[0]).input_ids), 16, 8))
    monkeypatch.setattr(rows_module, "FLUSH_S", 0.0)
    events = []
    score_batch = TransformersEngine.score_batch
    monkeypatch.setattr(TransformersEngine, "score_batch", lambda self, jobs, stop=None: (events.append("batch"), score_batch(self, jobs, stop))[1])
    evaluate(Config(model=tiny_llama, data=data, window=16, max_batch_tokens=16, bootstrap_samples=0),
             on_rows=lambda rows: events.extend(("row", r["index"]) for r in rows))  # fmt: skip
    assert events[:first_windows] == ["batch"] * first_windows and events[first_windows] == ("row", 0)
    handed = [e[1] for e in events if e != "batch"]
    assert handed == list(range(len(texts)))
    assert events[-1] == ("row", len(texts) - 1) and events[-2] == "batch"  # the last one right after its own last batch


def test_a_signal_saves_every_finished_document_first(tiny_llama, corpus, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "ppl_cli", "run", "--model", tiny_llama, "--data", corpus, "--window", "16", "--max-batch-tokens", "16",
               "-o", str(out)]  # fmt: skip
    proc = run_until(command, out, 3, signal.SIGINT)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    stderr = proc.stderr.read()
    saved = len(lines(out / "documents.jsonl"))
    assert proc.returncode == 130 and f"{saved} documents are saved" in stderr
    resumed = CliRunner().invoke(cli, ["run", *command[4:]])
    assert resumed.exit_code == 0 and f"resuming: {saved} documents of an earlier run are done" in resumed.stderr
    assert len(lines(out / "documents.jsonl")) == 24


# --- the progress bar --------------------------------------------------------------------------------


def test_the_bar_counts_what_is_scored_not_what_is_read():
    clock = [100.0]
    read = ReadTally(documents=6, tokens=10_000, bytes=4_000, finished=True)  # the reader is done: the total is known
    bar = Progress(read, 4_000, enabled=False, clock=lambda: clock[0])
    clock[0] = 110.0
    bar.update(tokens=1_000, documents=1)
    share, text = bar.line(clock[0])
    assert share == pytest.approx(0.1) and text.startswith("1.00k/10.0k tokens, 1/6 documents, 100 tok/s") and "01:30 left" in text
    ahead = Progress(ReadTally(documents=3, tokens=3_000, bytes=1_000), 4_000, enabled=False, clock=lambda: clock[0])
    ahead.update(tokens=600)
    share, text = ahead.line(clock[0])
    assert share == pytest.approx(600 / 12_000) and "/~12.0k tokens" in text  # 3 tokens a byte over 4,000 bytes
    unknown = Progress(ReadTally(documents=3, tokens=3_000, bytes=1_000), None, enabled=False)
    assert "/3.00k+ tokens" in unknown.line(time.perf_counter())[1]


def test_a_file_read_far_ahead_of_scoring_shows_how_much_is_scored(tiny_llama, corpus, monkeypatch, capsys):
    from ppl_cli.engine.transformers_engine import TransformersEngine
    from ppl_cli.runtime import progress

    monkeypatch.setattr(progress, "REFRESH_S", 0.0)
    score_batch = TransformersEngine.score_batch
    monkeypatch.setattr(TransformersEngine, "score_batch", lambda self, jobs, stop=None: (time.sleep(0.02), score_batch(self, jobs, stop))[1])  # scoring is slow
    evaluate(Config(model=tiny_llama, data=corpus, window=16, max_batch_tokens=16, bootstrap_samples=0), progress=True)
    drawn = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "tokens," in line]
    shares = [int(line.split("%")[0].split()[-1]) for line in drawn]
    assert shares[0] < 20 and shares[-1] == 100 and shares == sorted(shares)  # the whole file was read at once; the bar follows the scoring
    assert "24/24 documents" in drawn[-1]


# --- the default model's start ---------------------------------------------------------------------


def run_gguf(gguf, data, env, *extra):
    return subprocess.run([sys.executable, "-m", "ppl_cli", "run", "--model", gguf, "--data", data, "--json", *extra],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=300)  # fmt: skip


def test_a_gguf_model_is_dequantized_once_into_the_hf_cache(tiny_gguf, corpus, tmp_path):
    import torch
    import transformers

    hf_home = tmp_path / "hf"
    first = run_gguf(tiny_gguf, corpus, {"HF_HOME": str(hf_home)})
    assert first.returncode == 0, first.stderr
    assert "de-quantizing tiny.gguf once" in first.stderr
    [folder] = [p for p in (hf_home / "ppl-eval" / "gguf").iterdir() if p.name != "digests"]
    assert json.loads((folder / "source.json").read_text())["gguf_file"] == "tiny.gguf"
    second = run_gguf(tiny_gguf, corpus, {"HF_HOME": str(hf_home)})
    assert "from its de-quantized copy" in second.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["nll_sum"] == b["nll_sum"] and b["model"]["dequantized_copy"] == str(folder)
    # the copy is what transformers de-quantizes: the same logits as a direct load of the .gguf
    gguf = Path(tiny_gguf)
    direct = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cached = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.arange(1, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, cached(ids).logits)


def test_the_cache_follows_xdg_and_can_be_turned_off(tiny_gguf, corpus, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HOME"}
    done = subprocess.run([sys.executable, "-m", "ppl_cli", "run", "--model", tiny_gguf, "--data", corpus, "-q"],
                          env={**env, "XDG_CACHE_HOME": str(tmp_path / "xdg")}, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert list((tmp_path / "xdg" / "huggingface" / "ppl-eval" / "gguf").iterdir())
    off = run_gguf(tiny_gguf, corpus, {"HF_HOME": str(tmp_path / "off"), "PPL_EVAL_GGUF_CACHE": "0"})
    assert off.returncode == 0 and not (tmp_path / "off" / "ppl-eval").exists()


def test_two_processes_starting_at_once_share_one_copy(tiny_gguf, corpus, tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    command = [sys.executable, "-m", "ppl_cli", "run", "--model", tiny_gguf, "--data", corpus, "--json"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert json.loads(outputs[0][0])["nll_sum"] == json.loads(outputs[1][0])["nll_sum"]
    left = sorted(p.name for p in (tmp_path / "hf" / "ppl-eval" / "gguf").iterdir())
    assert len(left) == 2 and "digests" in left and not any(name.endswith(".tmp") for name in left)  # one copy, no half-built one


def test_quantize_takes_a_gguf_models_float_weights(tiny_gguf, corpus, tmp_path):
    pytest.importorskip("torchao")
    done = run_gguf(tiny_gguf, corpus, {"HF_HOME": str(tmp_path / "hf")}, "--quantize", "int8")
    assert done.returncode == 0, done.stderr
    model = json.loads(done.stdout)["model"]
    assert model["gguf_file"] == "tiny.gguf" and model["quantization"]["method"] == "torchao"
    assert model["weights"] == "tiny.gguf, de-quantized to float32, then quantized again by --quantize torchao-int8"


# --- scoring texts from Python ---------------------------------------------------------------------


def test_score_equals_the_cli_on_the_same_texts(tiny_llama, tmp_path, monkeypatch):
    import ppl_cli.engine.loading as loading

    texts = [" ".join(PROSE[k : k + 3]) for k in range(5)]
    data = write_corpus(tmp_path / "t.jsonl", texts)
    cli_rows = [json.loads(line) for line in CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama, "--data", data, "--jsonl"]).stdout.splitlines()]
    result = ppl_cli.score(texts, model=tiny_llama)
    assert [r["id"] for r in result.documents] == ["0", "1", "2", "3", "4"]
    assert [r["nll_sum"] for r in result.documents] == [r["nll_sum"] for r in cli_rows]
    loads = []
    real = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (loads.append(1), real(*a, **k))[1])
    model, tokenizer = ppl_cli.load(tiny_llama)
    for _ in range(2):
        again = ppl_cli.score(texts[:2], model=model, tokenizer=tokenizer, ids=["a", "b"], bootstrap_samples=0)
        assert [r["id"] for r in again.documents] == ["a", "b"] and again.documents[0]["nll_sum"] == cli_rows[0]["nll_sum"]
    assert len(loads) == 1
    with pytest.raises(PplError, match=r"to score texts from Python: ppl_cli.score\(texts\)"):
        evaluate(Config(model=tiny_llama, data=("A sentence to score.",)))


# --- bad records ---------------------------------------------------------------------------------------


def test_a_bad_record_names_its_line_and_reason_and_can_be_skipped_or_fixed(tiny_llama, tmp_path):
    good = [json.dumps({"text": " ".join(PROSE[k : k + 2])}) for k in range(6)]
    bad = ['{"text": "a\tb"}', '{"txt": "no text field"}']
    try:
        json.loads(bad[0])
    except json.JSONDecodeError as e:
        column = e.colno
    path = tmp_path / "c.jsonl"

    def write(line_4, line_7):
        path.write_text("\n".join([*good[:3], line_4, *good[3:5], line_7, good[5]]) + "\n")

    for out, then in ((tmp_path / "skipped", "skip"), (tmp_path / "fixed", "fix")):
        write(*bad)
        common = ["run", "-q", "--model", tiny_llama, "--data", str(path), "-o", str(out)]
        first = CliRunner().invoke(cli, common)
        assert first.exit_code == 3
        assert f"c.jsonl line 4 is not JSON: Invalid control character at column {column}" in first.stderr
        assert len(lines(out / "documents.jsonl")) == 3  # the documents before it are kept
        if then == "skip":  # the same command with --skip-bad-records goes on from there
            done = CliRunner().invoke(cli, [*common, "--skip-bad-records", "--json"])
            assert done.exit_code == 0, done.output
            summary = json.loads(done.stdout)
            assert summary["documents"] == 6 and summary["bad_records"]["count"] == 2
            assert [b["record"] for b in summary["bad_records"]["first"]] == ["c.jsonl line 4", "c.jsonl line 7"]
            assert "has no field 'text'" in summary["bad_records"]["first"][1]["error"]
        else:  # or the file is fixed: the same command goes on, the finished documents checked against it
            write('{"text": "a b"}', '{"text": "now it has one"}')
            assert CliRunner().invoke(cli, common).exit_code == 0
            assert len(lines(out / "documents.jsonl")) == 8


def test_a_changed_document_that_was_scored_is_refused(tiny_llama, tmp_path):
    path = write_corpus(tmp_path / "c.jsonl", ["one two three", "four five six", "seven eight"])
    out = tmp_path / "out"
    common = ["run", "-q", "--model", tiny_llama, "--data", path, "-o", str(out)]
    assert CliRunner().invoke(cli, common).exit_code == 0
    (out / "summary.json").unlink()
    write_corpus(tmp_path / "c.jsonl", ["one two three", "four five SIX", "seven eight"])
    refused = CliRunner().invoke(cli, common)
    assert refused.exit_code == 3 and "document 1 (c.jsonl line 2) is not the text that was scored" in refused.stderr


# --- smaller things ---------------------------------------------------------------------------------------


def test_an_id_field_is_used_by_default(tiny_llama, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"id": "alpha", "text": "a b c"}) + "\n" + json.dumps({"text": "d e f"}) + "\n" + json.dumps({"id": 7, "text": "g"}) + "\n")
    result = evaluate(Config(model=tiny_llama, data=str(path), bootstrap_samples=0))
    assert [r["id"] for r in result.documents] == ["alpha", "c.jsonl:2", "7"]


def test_option_errors_are_one_line(tiny_llama):
    for args, says in ((["--windwo", "3"], "No such option '--windwo'"), (["--window", "abc"], "'abc' is not a valid integer")):
        result = CliRunner().invoke(cli, ["run", *args])
        assert result.exit_code == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("ppl-eval: error: ") and says in result.stderr
    assert "see ppl-eval run --help" in result.stderr


def test_every_run_option_is_in_exactly_one_group():
    import click
    from click_option_group import GroupedOption

    command = cli.get_command(None, "run")
    options = [p for p in command.params if isinstance(p, click.Option) and not p.hidden and p.name != "help"]  # not the groups' hidden title options
    groups = {}
    for option in options:
        assert isinstance(option, GroupedOption), option.name
        groups.setdefault(option.group.name, []).append(option.name)
    assert list(groups) == ["Model", "Engine", "Data", "What is scored", "Windows and conventions", "Signals and extras", "Output", "Performance and scale-out"]
    assert sum(len(v) for v in groups.values()) == len(options) == len({o.name for o in options})
    assert "Min-K% and Min-K%++" in CliRunner().invoke(cli, ["run", "--help"]).output


def test_the_hub_unreachable_is_one_line_at_once(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "ppl_cli", "run", "--model", "someone/some-model", "--data", "-"], input="text",
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 4 and "is not in the local Hugging Face cache and the hub (http://127.0.0.1:9) cannot be reached" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and time.monotonic() - started < 60  # not transformers' 25 s of retries


def test_a_cached_hub_model_loads_when_the_hub_is_unreachable(tiny_llama, tmp_path):
    import shutil

    snapshot = tmp_path / "hf" / "hub" / "models--someone--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_llama, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "ppl_cli", "run", "--model", "someone/tiny", "--data", "-", "--json"], input="some text here",
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["documents"] == 1


def test_one_document_is_one_document_and_a_finished_run_says_so(tiny_llama, tmp_path):
    out = tmp_path / "out"
    args = ["run", "--model", tiny_llama, "--data", "-", "-o", str(out)]
    first = CliRunner().invoke(cli, args, input="just one text here")
    assert "1 document," in first.stdout
    again = CliRunner().invoke(cli, args, input="just one text here")
    assert "nothing left to score" in again.stdout and "0 tokens/s" not in again.stdout


def test_select_leaves_no_lock_file(tiny_llama, corpus, tmp_path):
    out = tmp_path / "run"
    CliRunner().invoke(cli, ["run", "-q", "--model", tiny_llama, "--data", corpus, "-o", str(out)])
    done = CliRunner().invoke(cli, ["select", str(out), "--buckets", "50", "-o", str(tmp_path / "buckets")])
    assert done.exit_code == 0, done.output
    assert not [p.name for p in (tmp_path / "buckets").iterdir() if "lock" in p.name]
