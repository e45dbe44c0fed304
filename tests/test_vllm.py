"""The vLLM engine against the transformers engine on the same windows, and as users run it.

vLLM runs from its CPU build in a virtual environment of its own (scripts/vllm_venv.sh; the tests
skip with the reason without it): SmolLM2-135M (the GGUF de-quantized, float32) on WikiText-2
articles longer than a window, every document's nll_sum within 1e-5 relative of the transformers
engine's, for each convention, --lengths, pairs with --ifd, shards, and the values kept per token.
One vLLM engine serves the in-process runs (tests/vllm_runs.py); the CLI runs start their own, as a
user's do: SIGINT (no vLLM process left behind), resume after it and after kill -9, and the
errors; the commands read the runs' output.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import lines
from engine_fixtures import CLI_RUN, ROOT, RUNS, TOLERANCE, WINDOW, assert_close, rows, vllm_env
from ppl_cli.cli import cli
from ppl_cli.engine.watchdog import GRACE_S

ENGINE_ARGS = {"dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": 0.2}  # eager: starts in seconds, not a minute of compiling
CLI_ENGINE = ["--engine", "vllm", "--gpu-memory-utilization", "0.2", "--vllm-arg", "enforce_eager=true"]


@pytest.fixture(scope="module")
def vllm_runs(vllm_python, smollm2, data, tmp_path_factory) -> dict[str, Path]:
    """Every run of RUNS through one vLLM engine (tests/vllm_runs.py), on SmolLM2's de-quantized copy."""
    out = tmp_path_factory.mktemp("vllm-runs")
    folder = smollm2.info["dequantized_copy"]
    runs = [{"output": str(out / name), "config": {"data": [str(data[which])], **fields}} for name, (which, fields) in RUNS.items()]
    spec = out / "spec.json"
    spec.write_text(json.dumps({"model": folder, "max_model_len": WINDOW + 1, "engine_args": ENGINE_ARGS, "runs": runs}))
    done = subprocess.run([vllm_python, str(ROOT / "tests" / "vllm_runs.py"), str(spec)], capture_output=True, text=True, timeout=900, env=vllm_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: out / name for name in RUNS}


@pytest.mark.parametrize("name", [n for n in RUNS if not n.startswith("shard")])
@pytest.mark.slow
def test_every_document_equals_the_transformers_engine(name, vllm_runs, transformers_runs):
    ours, theirs = rows(vllm_runs[name]), rows(transformers_runs[name])
    assert [r["index"] for r in ours] == [r["index"] for r in theirs] and ours
    for a, b in zip(ours, theirs):
        assert a["tokens"] == b["tokens"]
        assert_close(a["nll_sum"], b["nll_sum"], f"{name} document {a['index']}")
        for key in ("unconditional_nll_sum", "published_nll_sum"):
            if key in b:
                assert_close(a[key], b[key], f"{name} document {a['index']} {key}")
        if "lengths" in b:
            assert a["lengths"]["tokens"] == b["lengths"]["tokens"]
            for x, y in zip(a["lengths"]["nll"], b["lengths"]["nll"]):
                assert (x is None) == (y is None) and (x is None or abs(x - y) <= TOLERANCE * abs(y))
    summary = json.loads((vllm_runs[name] / "summary.json").read_text())
    assert summary["model"]["engine"]["name"] == "vllm" and summary["model"]["engine"]["logprobs_mode"] == "raw_logprobs"
    assert json.loads((vllm_runs[name] / "run.json").read_text())["engine"] == "vllm"


@pytest.mark.slow
def test_windows_longer_than_one_request_are_compared(transformers_runs):
    """Every article has more tokens than a window: the sliding windows' context carries across requests."""
    assert min(r["tokens"] for r in rows(transformers_runs["sliding"])) > WINDOW


@pytest.mark.slow
def test_the_values_kept_per_token_are_the_transformers_engines(vllm_runs, transformers_runs):
    """--save-tokens: log p and rank (vLLM's rank counts ties ahead, ours behind, and two tokens
    within rounding of each other can swap: equal on all but a few per thousand); --signals' Min-K%
    and zlib ratio, the two that need the distribution null; words uncorrected."""
    import pyarrow.parquet as pq

    v, t = vllm_runs["kept"], transformers_runs["kept"]
    ours, theirs = pq.read_table(v / "tokens").to_pandas(), pq.read_table(t / "tokens").to_pandas()
    assert "entropy" not in ours.columns and len(ours) == len(theirs)
    assert np.abs(ours["logprob"].to_numpy() - theirs["logprob"].to_numpy()).max() < 1e-4
    assert (ours["rank"].to_numpy() == theirs["rank"].to_numpy()).mean() > 0.99
    for a, b in zip(rows(v), rows(t)):
        assert a["min_k_plus_plus"] is None and a["mean_entropy"] is None
        assert abs(a["min_k"] - b["min_k"]) < 1e-4 and abs(a["zlib_ratio"] - b["zlib_ratio"]) <= TOLERANCE * b["zlib_ratio"]
        assert a["group"] == b["group"]
    words_v, words_t = pq.read_table(v / "words").to_pandas(), pq.read_table(t / "words").to_pandas()
    assert len(words_v) == len(words_t)
    assert np.nanmax(np.abs(words_v["surprisal"].to_numpy(float) - words_t["surprisal"].to_numpy(float))) < 1e-3
    summary = json.loads((v / "summary.json").read_text())
    assert set(summary["groups"]) == {"a", "b"} and "min_k" in summary["signals"] and "min_k_plus_plus" not in summary["signals"]


@pytest.mark.slow
def test_shards_through_vllm_merge_into_the_whole_run(vllm_runs, tmp_path):
    merged = CliRunner().invoke(cli, ["merge", str(vllm_runs["shard-0"]), str(vllm_runs["shard-1"]), "-o", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.output
    whole = {r["index"]: r["nll_sum"] for r in rows(vllm_runs["sliding"])}
    for row in rows(tmp_path / "merged"):
        assert_close(row["nll_sum"], whole[row["index"]], f"merged document {row['index']}")


@pytest.mark.slow
def test_compare_report_and_select_read_a_vllm_run(vllm_runs, transformers_runs, tmp_path):
    runner = CliRunner()
    compared = runner.invoke(cli, ["compare", str(transformers_runs["sliding"]), str(vllm_runs["sliding"]), "--json"])
    assert compared.exit_code == 0, compared.output
    delta = json.loads(compared.output)["token_perplexity"]
    assert abs(delta["delta"]) < 1e-4
    report = runner.invoke(cli, ["report", str(vllm_runs["kept"]), str(transformers_runs["kept"]), "-o", str(tmp_path / "r.html")])
    assert report.exit_code == 0, report.output
    page = (tmp_path / "r.html").read_text()
    assert "through vllm" in page and "coloured" in report.output
    selected = runner.invoke(cli, ["select", str(vllm_runs["sliding"]), "--keep", "low", "--keep-fraction", "0.5", "-o", str(tmp_path / "low.jsonl")])
    assert selected.exit_code == 0, selected.output
    assert len(lines(tmp_path / "low.jsonl")) == 2


def vllm_cli(vllm_python, *args) -> list[str]:
    return [vllm_python, "-m", "ppl_cli", "run", *CLI_ENGINE, *args]


def descendants(pid: int) -> set[int]:
    """Every process under pid (vLLM's engine core and workers), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    return {p for p in pids if Path(f"/proc/{p}").exists() and "(Z)" not in Path(f"/proc/{p}/stat").read_text().split(")")[1][:4]}


def finished(out: Path) -> set[int]:
    """The documents with a row in documents.jsonl (a resumed run may write a row again: a group of
    documents is scored again whole where a stop left it part-written; the next start keeps one)."""
    return {int(m.group(1)) for m in re.finditer(r'^\{"index": (\d+),.*\}$', "\n".join(lines(out / "documents.jsonl")), re.M)}


def start_and_wait_for_rows(cmd: list[str], out: Path, more_than: int) -> tuple[subprocess.Popen, set[int]]:
    """The command started in its own process group, once more than `more_than` documents have a row;
    with the processes it started (vLLM's engine core and workers) seen on the way."""
    proc = subprocess.Popen(cmd, env=vllm_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    workers: set[int] = set()
    while proc.poll() is None and time.time() < deadline and len(finished(out)) <= more_than:
        workers |= descendants(proc.pid)
        time.sleep(0.05)
    workers |= descendants(proc.pid)
    assert proc.poll() is None and workers, f"vLLM started no worker process: {proc.stderr.read()[-3000:]}"
    return proc, workers


@pytest.mark.slow
def test_sigint_then_kill_9_then_the_same_command_equals_the_transformers_engine(vllm_python, data, transformers_runs, tmp_path):
    """The default model through the CLI, as a user runs it. Ctrl-C: exit 130, a one-line stop, no
    vLLM process left, the rows kept; the same command resumes; kill -9 of ppl-eval's process
    mid-run, and vLLM's processes end too (vLLM #55510: its engine core does not watch its parent;
    engine/watchdog.py); the same command again finishes, its rows those of the transformers engine's
    uninterrupted run, stdout the summary alone (vLLM's output went to its log)."""
    out = tmp_path / "run"
    which, fields = CLI_RUN
    options = [f"--{k.replace('_', '-')}={v}" for k, v in fields.items()]
    cmd = vllm_cli(vllm_python, "--data", str(data[which]), *options, "--vllm-arg", "max_num_seqs=1", "-o", str(out))  # a window a step: stops land between documents
    proc, workers = start_and_wait_for_rows(cmd, out, 0)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group gets it
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "stopped by SIGINT" in stderr and "error:" not in stderr, stderr[-2000:]
    deadline = time.time() + 30
    while alive(workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not alive(workers), f"vLLM processes left: {alive(workers)}"
    kept = len(finished(out))
    assert 1 <= kept < 7

    proc, workers = start_and_wait_for_rows([*cmd, "-q"], out, kept)
    os.kill(proc.pid, signal.SIGKILL)  # ppl-eval alone, as kill -9 PID or the OOM killer: vLLM's processes must not outlive it
    proc.wait()
    assert kept < len(finished(out)) < 8
    deadline = time.time() + GRACE_S + 20
    while alive(workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not alive(workers), f"vLLM processes outlived ppl-eval: {alive(workers)}"

    done = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=600, env=vllm_env())
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["model"]["id"] == "smollm2-135m" and summary["model"]["engine"]["name"] == "vllm" and summary["documents"] == 8
    assert "INFO" not in done.stderr, done.stderr[-2000:]
    for a, b in zip(rows(out), rows(transformers_runs["cli"]), strict=True):
        assert a["index"] == b["index"] and a["tokens"] == b["tokens"]
        assert_close(a["nll_sum"], b["nll_sum"], f"document {a['index']}")


@pytest.mark.slow
@pytest.mark.parametrize(
    "options,message",
    [
        (["--vllm-arg", "no_such_argument=1"], "vLLM cannot run"),
        (["--gpu-memory-utilization", "0.0001"], "vLLM ran out of memory"),
        (["--without-weights"], "vLLM cannot run"),
    ],
)
def test_what_vllm_refuses_is_one_line_and_exit_4(vllm_python, tiny_llama, corpus_jsonl, options, message, tmp_path):
    """An argument vLLM lacks, no memory for its KV cache, a model folder without its weights."""
    import shutil

    model = tiny_llama
    if options == ["--without-weights"]:
        model = shutil.copytree(tiny_llama, tmp_path / "no-weights", ignore=shutil.ignore_patterns("*.safetensors"))
        options = []
    engine = [o for o in CLI_ENGINE if o not in ("--gpu-memory-utilization", "0.2")] if "--gpu-memory-utilization" in options else CLI_ENGINE
    cmd = [vllm_python, "-m", "ppl_cli", "run", *engine, "--model", str(model), "--data", corpus_jsonl, *options]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=vllm_env())
    assert done.returncode == 4, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()
    assert message in last[-1] and last[-1].startswith("ppl-eval: error:"), done.stderr[-3000:]
    assert "Traceback" not in done.stderr


def test_without_vllm_the_error_says_how_to_install_it(corpus_jsonl):
    """In this environment vLLM is not installed (it lives in its own)."""
    pytest.importorskip("torch")
    if "vllm" in sys.modules or any((Path(p) / "vllm").is_dir() for p in sys.path if p):
        pytest.skip("vLLM is installed here")
    done = CliRunner().invoke(cli, ["run", "--engine", "vllm", "--data", corpus_jsonl])
    assert done.exit_code == 4
    assert "pip install 'ppl-eval[vllm]'" in done.output and len(done.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "options,message",
    [
        (["--reference-model", "x"], "--reference-model needs each position's whole distribution"),
        (["--save-words", "-o", "out"], "add --no-bow-correction"),
        (["--device-map", "auto"], "--tensor-parallel-size"),
        (["--quantize", "int8"], "--vllm-arg quantization="),
        (["--device", "cuda"], "CUDA_VISIBLE_DEVICES"),
        (["--vllm-arg", "enable_prefix_caching=true"], "vLLM #42019"),
        (["--vllm-arg", "dtype=float16"], "from --dtype"),
        (["--vllm-arg", "novalue"], "KEY=VALUE"),
        (["--tensor-parallel-size", "0"], "at least 1"),
    ],
)
def test_what_the_vllm_engine_cannot_do_is_refused_before_anything_loads(options, message, corpus_jsonl):
    done = CliRunner().invoke(cli, ["run", "--engine", "vllm", "--data", corpus_jsonl, *options])
    assert done.exit_code == 2 and message in done.output and len(done.output.strip().splitlines()) == 1, done.output


def test_vllm_options_need_the_vllm_engine(corpus_jsonl):
    for options in (["--tensor-parallel-size", "2"], ["--vllm-arg", "quantization=fp8"], ["--gpu-memory-utilization", "0.5"]):
        done = CliRunner().invoke(cli, ["run", "--data", corpus_jsonl, *options])
        assert done.exit_code == 2 and "applies to --engine vllm" in done.output, done.output


def test_engine_arguments_put_ppl_evals_first_and_read_values_as_json():
    from ppl_cli import Config
    from ppl_cli.engine.vllm_engine import VllmModel, engine_arguments

    model = VllmModel("/models/x", None, None, 4096, 1, {})
    config = Config(engine="vllm", tensor_parallel_size=4, vllm_args=("kv_cache_dtype=fp8", "max_num_seqs=64", "distributed_executor_backend=ray"))
    arguments = engine_arguments(config, model, 2048)
    assert arguments["max_model_len"] == 2049 and arguments["enable_prefix_caching"] is False and arguments["skip_tokenizer_init"] is True
    assert arguments["tensor_parallel_size"] == 4 and arguments["max_num_seqs"] == 64 and arguments["kv_cache_dtype"] == "fp8"
    assert arguments["distributed_executor_backend"] == "ray" and arguments["load_format"] == "safetensors"
    with pytest.raises(Exception, match="at least 2049"):
        engine_arguments(Config(engine="vllm", vllm_args=("max_model_len=2048",)), model, 2048)
