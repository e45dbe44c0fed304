"""The served engine: ppl-eval's windows scored by a model behind an OpenAI-compatible server
(`--model http(s)://host/v1`), many requests in flight, exactly as a local model is scored.

Each window goes to the completions endpoint as a token-id prompt, temperature 0 and one token to
generate, and comes back as each prompt token's log-probability given the tokens before it:
vLLM's `prompt_logprobs` field (with each token's rank) where the server has it, else `echo` with
`logprobs` (OpenAI's legacy format: the first token has none). One probe at start finds which, and
a server that returns no prompt log-probabilities (llama.cpp's server) is refused. A window is sent
whole: lm-eval's spans (window + 1 tokens, of which its model reads `window`) make the model read
one token more, which changes no log-probability before it; so the server's max_model_len must hold
the longest span and the one token generated (a window's default follows it).

ppl-eval tokenizes: the served model's tokenizer (its name on the server, or --tokenizer) is loaded
here, and where the server has /tokenize both are checked once on a probe text. Requests that fail
the way servers fail (timeouts, refused or dropped connections, 429, 5xx, a body cut short) are
retried with exponential backoff and full jitter, honouring Retry-After; a reply that is wrong
(no log-probabilities, the wrong count, a non-finite value) is an error naming the document and
window. The key comes from an environment variable only and is sent in the Authorization header;
it is never written or printed, and the URL is recorded without credentials or query string.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ..config import DEFAULT_CONCURRENCY, Config, public_url
from ..errors import EXIT_MODEL, EXIT_NUMERIC, EXIT_SERVER, PplError, first_line
from .base import Job, RequestEngine, Scored, WindowError, window_sums
from .loading import PROBE_TEXT, bos_token_id, explain_load_error, first_difference, hub_access, resolve_model

logger = logging.getLogger(__name__)
RETRIED_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}  # what a busy, restarting or overloaded server answers
BACKOFF_S = 0.5  # the first retry's longest wait; each next one doubles it
MAX_BACKOFF_S = 30.0
DEFAULT_BATCH_TOKENS = 65536


class ServerGone(Exception):
    """A request that kept failing the way a server that is down fails, after every retry."""


class Client:
    """HTTP(S) requests to one server, a kept-alive connection a thread, retried where a server's
    failure is passing. `key`: sent as a bearer token, never shown (errors are cleaned of it)."""

    def __init__(self, url: str, key: str | None, insecure: bool, timeout: float, retries: int):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PplError(f"{public_url(url)} is not an http(s) URL")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.base = parts.path.rstrip("/")  # /v1
        self.query = f"?{parts.query}" if parts.query else ""
        self.key, self.timeout, self.retries = key, timeout, retries
        self.url = public_url(url)
        self.context = None
        if parts.scheme == "https":
            self.context = ssl.create_default_context()
            if insecure:
                self.context.check_hostname = False
                self.context.verify_mode = ssl.CERT_NONE
        self.local = threading.local()
        self.open: set[http.client.HTTPConnection] = set()  # every thread's connection, for close()
        self.lock = threading.Lock()
        self.closed = False

    def connection(self) -> http.client.HTTPConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            if self.scheme == "https":
                conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.context)
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self.local.conn = conn
            with self.lock:
                self.open.add(conn)
        return conn

    def drop(self) -> None:
        conn = getattr(self.local, "conn", None)
        if conn is not None:
            conn.close()
            with self.lock:
                self.open.discard(conn)
        self.local.conn = None

    def close(self) -> None:
        """End every request in flight now (their threads see a closed socket) and start no more."""
        self.closed = True
        with self.lock:
            for conn in self.open:
                if conn.sock is not None:
                    try:
                        conn.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def request(self, method: str, path: str, payload: dict | None = None, root: bool = False, retry: bool = True) -> tuple[int, Any]:
        """(status, the JSON reply) of one request, retried while the server fails the way a
        passing failure does; `root`: the path is under the server's root, not its /v1."""
        target = ("" if root else self.base) + path + self.query
        body = json.dumps(payload).encode("utf-8") if payload is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        failure = ""
        for attempt in range(self.retries + 1):
            if self.closed:
                raise ServerGone("the run is stopping")
            wait_s = None
            try:
                conn = self.connection()
                conn.request(method, target, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                if response.status in RETRIED_STATUS and retry:
                    failure = f"HTTP {response.status}"
                    wait_s = retry_after(response.getheader("Retry-After"))
                    if response.getheader("Connection", "").lower() == "close":
                        self.drop()
                else:
                    try:
                        return response.status, json.loads(data) if data else None
                    except ValueError:  # a body cut short, or not JSON: as a dropped connection
                        if response.status >= 400:
                            return response.status, {"error": data[:300].decode("utf-8", "replace")}
                        failure = f"a reply that is not whole JSON ({len(data)} bytes)"
                        self.drop()
            except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, closed mid-reply
                failure = self.clean(first_line(e) if str(e) else type(e).__name__)
                self.drop()
            if not retry or attempt == self.retries:
                break
            time.sleep(wait_s if wait_s is not None else random.uniform(0, min(MAX_BACKOFF_S, BACKOFF_S * 2**attempt)))
        raise ServerGone(f"{failure} after {self.retries + 1} tries" if retry else failure)

    def clean(self, text: str) -> str:
        """An error's text without the key, should a server or library have echoed it."""
        return text.replace(self.key, "***") if self.key else text


def retry_after(value: str | None) -> float | None:
    """Retry-After's wait in seconds (a number of seconds or an HTTP date), at most MAX_BACKOFF_S x 4."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_BACKOFF_S * 4)


def api_key(config: Config) -> str | None:
    """The key from --api-key-env's variable (default OPENAI_API_KEY, when set); never an option's value."""
    name = config.api_key_env or "OPENAI_API_KEY"
    key = os.environ.get(name)
    if config.api_key_env and not key:
        raise PplError(f"--api-key-env {name}: the variable {name} is not set (or empty)")
    return key or None


@dataclass
class ServedModel:
    """A served model before scoring: its server, ppl-eval's own tokenizer, and how the server is asked."""

    client: Client
    served: str  # the model's name on the server
    mode: str  # "prompt_logprobs" or "echo"
    tokenizer: Any
    max_model_len: int | None  # the server's, where it says
    context_length: int | None  # the longest window it can score: max_model_len less the tokens a window adds
    bos_id: int | None
    info: dict

    def start(self, config: Config, window: int, keep: Sequence[str], max_batch_tokens: int | None) -> ServedEngine:
        added = longest_addition(config)
        if self.max_model_len is not None and window + added > self.max_model_len:
            raise PplError(
                f"the server's max_model_len ({self.max_model_len}) leaves no room for windows of {window} tokens (a request holds"
                f" {window + added}): lower --window to {self.max_model_len - added}, or serve the model with --max-model-len {window + added}"
            )
        concurrency = config.concurrency or DEFAULT_CONCURRENCY
        self.info["engine"]["concurrency"] = concurrency
        return ServedEngine(self, keep, max_batch_tokens or max(DEFAULT_BATCH_TOKENS, window), concurrency)


def open_served(config: Config) -> ServedModel:
    """The server probed once: its models, whether it returns prompt log-probabilities (and how),
    the tokenizer loaded here and checked against the server's /tokenize; said in one line."""
    client = Client(config.model, api_key(config), config.insecure, config.request_timeout, config.max_retries)
    models = checked(client, "GET", "/models", what="listing its models")
    listed = [m for m in (models or {}).get("data", []) if isinstance(m, dict) and "id" in m]
    served = config.served_model or (listed[0]["id"] if len(listed) == 1 else None)
    if served is None:
        names = ", ".join(m["id"] for m in listed) or "none"
        raise PplError(f"{client.url} serves {len(listed)} models ({names}): name one with --served-model", EXIT_MODEL)
    entry = next((m for m in listed if m["id"] == served), None)
    if entry is None and listed:
        raise PplError(f"{client.url} does not serve {served!r} (it serves {', '.join(m['id'] for m in listed)})", EXIT_MODEL)
    tokenizer = served_tokenizer(config, served, entry)
    mode = request_mode(client, served, tokenizer)
    checked_ids = check_tokenizer(client, served, tokenizer)
    max_model_len = (entry or {}).get("max_model_len")
    context = max_model_len - longest_addition(config) if isinstance(max_model_len, int) else None
    owned_by = (entry or {}).get("owned_by")
    logger.info(
        "served model %s at %s%s: prompt log-probabilities from %s; tokenizer %s",
        served, client.url, f" ({owned_by})" if owned_by else "", "prompt_logprobs" if mode == "prompt_logprobs" else "echo with logprobs", checked_ids,
    )  # fmt: skip
    info = {
        "id": client.url,
        "source": client.url,
        "gguf_file": None,
        "kind": "served",
        "revision": None,
        "commit": None,
        "architecture": None,
        "parameters": None,
        "vocab_size": len(tokenizer),
        "context_length": context,
        "dtype": "served",
        "device": "server",
        "engine": {"name": "served", "served_model": served, "owned_by": owned_by, "max_model_len": max_model_len, "request": mode,
                   "tokenizer": config.tokenizer or served, "tokenizer_check": checked_ids},  # fmt: skip
    }
    return ServedModel(client, served, mode, tokenizer, max_model_len, context, bos_token_id(tokenizer), info)


def longest_addition(config: Config) -> int:
    """Tokens a request holds beyond the window: the one generated, and lm-eval's span's extra token."""
    return 2 if config.convention == "lm-eval" else 1


def checked(client: Client, method: str, path: str, payload: dict | None = None, what: str = "", allow: set[int] = frozenset()):
    """A request's JSON reply; a failure as one line (the server gone, the key refused, an error
    reply other than those `allow`ed, which come back as their reply)."""
    try:
        status, reply = client.request(method, path, payload)
    except ServerGone as e:
        raise PplError(f"the server at {client.url} is not answering ({e}) while {what}", EXIT_SERVER) from None
    if status in (401, 403):
        raise PplError(f"the server at {client.url} refused the key (HTTP {status}): set the variable --api-key-env names (default OPENAI_API_KEY)", EXIT_SERVER)
    if status in allow:
        return reply if isinstance(reply, dict) else {"error": reply}
    if status >= 400:
        raise PplError(f"the server at {client.url} answered HTTP {status} while {what}: {client.clean(error_text(reply))}", EXIT_SERVER)
    return reply


def error_text(reply) -> str:
    """An error reply's message (OpenAI's {"error": {"message"}} or vLLM's {"message"}), on one line."""
    if isinstance(reply, dict):
        inner = reply.get("error", reply)
        text = inner.get("message", inner) if isinstance(inner, dict) else inner
        return " ".join(str(text).split())[:300]
    return " ".join(str(reply).split())[:300]


def served_tokenizer(config: Config, served: str, entry: dict | None):
    """--tokenizer, else the served model's name (or the `root` vLLM lists for it), loaded here."""
    import transformers

    name = config.tokenizer or served
    tried = [name] + ([entry["root"]] if not config.tokenizer and entry and entry.get("root") and entry["root"] != name else [])
    failure = None
    for candidate in tried:
        source = resolve_model(candidate) if not candidate.startswith(("http://", "https://")) else None
        if source is None:
            continue
        kwargs = {"trust_remote_code": config.trust_remote_code}
        try:
            if source.kind == "hub":
                kwargs.update(hub_access(candidate, None))
            if source.gguf_file:
                kwargs["gguf_file"] = source.gguf_file
            return transformers.AutoTokenizer.from_pretrained(source.location, **kwargs)
        except PplError as e:
            failure = str(e)
        except Exception as e:
            failure = explain_load_error(candidate, e)
    raise PplError(f"cannot load the served model's tokenizer ({failure or name}): give one with --tokenizer (a hub id or a folder)", EXIT_MODEL)


def request_mode(client: Client, served: str, tokenizer) -> str:
    """How the server returns prompt log-probabilities, found with one tiny request: vLLM's
    prompt_logprobs, else echo with logprobs."""
    ids = tokenizer("The cat sat.", add_special_tokens=False).input_ids[:3] or [0, 1, 2]
    base = {"model": served, "prompt": ids, "max_tokens": 1, "temperature": 0}
    reply = checked(client, "POST", "/completions", {**base, "prompt_logprobs": 0}, what="probing it", allow={400})
    choice = first_choice(reply)
    if choice is not None and isinstance(choice.get("prompt_logprobs"), list) and len(choice["prompt_logprobs"]) == len(ids):
        return "prompt_logprobs"
    reply = checked(client, "POST", "/completions", {**base, "echo": True, "logprobs": 0}, what="probing it", allow={400})
    token_logprobs = ((first_choice(reply) or {}).get("logprobs") or {}).get("token_logprobs")
    if isinstance(token_logprobs, list) and len(token_logprobs) >= len(ids) and all(isinstance(v, (int, float)) for v in token_logprobs[1 : len(ids)]):
        return "echo"
    why = error_text(reply) if isinstance(reply, dict) and "error" in reply else "its replies have no log-probabilities for the prompt's tokens"
    raise PplError(
        f"the server at {client.url} returns no prompt log-probabilities ({client.clean(why)}): ppl-eval needs prompt_logprobs (vLLM) or echo with"
        " logprobs (llama.cpp's server has neither)",
        EXIT_MODEL,
    )


def first_choice(reply) -> dict | None:
    choices = reply.get("choices") if isinstance(reply, dict) else None
    return choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None


def check_tokenizer(client: Client, served: str, tokenizer) -> str:
    """The local tokenizer's ids for a probe text against the server's /tokenize, where it has one."""
    local = tokenizer(PROBE_TEXT, add_special_tokens=False).input_ids
    try:
        status, reply = client.request("POST", "/tokenize", {"model": served, "prompt": PROBE_TEXT, "add_special_tokens": False}, root=True, retry=False)
    except ServerGone:
        return "not checked (the server has no /tokenize)"
    remote = reply.get("tokens") if isinstance(reply, dict) and status < 400 else None
    if not isinstance(remote, list):
        return "not checked (the server has no /tokenize)"
    first = first_difference(local, remote)
    if first is not None:
        raise PplError(
            f"the local tokenizer and the server's split a probe text differently from token {first} ({local[first:first + 3]} here,"
            f" {remote[first:first + 3]} on the server): give the served model's own tokenizer with --tokenizer",
            EXIT_MODEL,
        )
    return "checked against the server's /tokenize"


class ServedEngine(RequestEngine):
    name = "served"

    def __init__(self, model: ServedModel, keep: Sequence[str], max_batch_tokens: int, concurrency: int):
        self.model, self.client = model, model.client
        self.keeps = frozenset({"nll", "rank"} if model.mode == "prompt_logprobs" else {"nll"})
        self.keep = tuple(k for k in keep if k in self.keeps)
        self.max_batch_tokens, self.concurrency = max_batch_tokens, concurrency
        self.dtype = "served"
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="ppl-eval-request")

    def stream(self, jobs: Sequence[Job], batches: list[list[int]], stop=None) -> Iterator[tuple[list[int], list[Scored]]]:
        """Every window of the batches in flight, `concurrency` requests at a time; a batch handed
        back when its last window is done; stop.check() at least every quarter second."""
        pending = {}
        results: list[list[Scored | None]] = [[None] * len(batch) for batch in batches]
        left = [len(batch) for batch in batches]
        for k, batch in enumerate(batches):
            for p, i in enumerate(batch):
                pending[self.pool.submit(self.score_job, jobs[i], i)] = (k, p)
        try:
            while pending:
                done, _ = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                if stop is not None:
                    stop.check()
                for future in done:
                    k, p = pending.pop(future)
                    results[k][p] = future.result()
                    left[k] -= 1
                    if not left[k]:
                        yield batches[k], results[k]
        finally:
            for future in pending:
                future.cancel()

    def score_job(self, job: Job, index: int) -> Scored:
        payload = self.payload(job)
        try:
            status, reply = self.client.request("POST", "/completions", payload)
        except ServerGone as e:
            raise PplError(f"the server at {self.client.url} stopped answering ({e})", EXIT_SERVER) from None
        if status in (401, 403):
            raise PplError(f"the server at {self.client.url} refused the key (HTTP {status})", EXIT_SERVER)
        if status >= 400:
            raise WindowError(index, f"the server answered HTTP {status}: {self.client.clean(error_text(reply))}", EXIT_SERVER)
        return self.scored(job, reply, index)

    def payload(self, job: Job) -> dict:
        """One window's request: its tokens as the prompt, one token generated."""
        payload = {"model": self.model.served, "prompt": job.tokens.tolist(), "max_tokens": 1, "temperature": 0}
        if self.model.mode == "prompt_logprobs":
            payload["prompt_logprobs"] = 0
        else:
            payload.update(echo=True, logprobs=0)
        return payload

    def scored(self, job: Job, reply, index: int) -> Scored:
        """A reply's log-probabilities of the window's scored tokens, checked: present, as many as scored, finite."""
        tokens = job.tokens.tolist()
        choice = first_choice(reply)
        if choice is None:
            raise WindowError(index, "the server's reply has no choices", EXIT_SERVER)
        ranks = None
        if self.model.mode == "prompt_logprobs":
            entries = choice.get("prompt_logprobs")
            if not isinstance(entries, list) or len(entries) != len(tokens):
                count = len(entries) if isinstance(entries, list) else "no"
                raise WindowError(index, f"the server returned {count} prompt log-probabilities for a prompt of {len(tokens)} tokens", EXIT_SERVER)
            picked = [(entries[p] or {}).get(str(tokens[p])) for p in range(job.context, len(tokens))]
            if not all(isinstance(e, dict) and "logprob" in e for e in picked):
                raise WindowError(index, "the server's reply lacks the log-probability of a token it was given", EXIT_SERVER)
            logprobs, ranks = [e["logprob"] for e in picked], [e.get("rank") for e in picked]
        else:
            values = (choice.get("logprobs") or {}).get("token_logprobs")
            if not isinstance(values, list) or len(values) < len(tokens):
                count = len(values) if isinstance(values, list) else "no"
                raise WindowError(index, f"the server returned {count} log-probabilities for a prompt of {len(tokens)} tokens", EXIT_SERVER)
            logprobs = values[job.context : len(tokens)]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in logprobs):
            raise WindowError(index, "the server returned a missing or non-finite log-probability", EXIT_NUMERIC)
        nll = -np.asarray(logprobs, dtype=np.float64)
        kept = {"nll": nll.astype(np.float32), "token_id": job.tokens[job.context :].numpy().astype(np.int64)}
        if "rank" in self.keep and ranks is not None and all(isinstance(r, int) for r in ranks):
            kept["rank"] = np.asarray(ranks, dtype=np.int64)
        return Scored(window_sums(nll), kept)

    def vocab_size(self) -> int:
        return len(self.model.tokenizer)

    def close(self) -> None:
        """No request left behind: the pending ones cancelled, those in flight cut off."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
