"""The vLLM engine: ppl-eval's windows scored by vLLM in this process (its worker processes, tensor and
pipeline parallel over GPUs, Ray across nodes, its kernels and quantized formats).

Each window goes to vLLM as a token prompt with SamplingParams(max_tokens=1, temperature=0,
prompt_logprobs=0, detokenize=False, flat_logprobs=True): vLLM returns every prompt token's
log-probability given the tokens before it (None for the first) and its rank, from its raw
log-softmax in float32 (logprobs_mode raw_logprobs, checked when the engine starts). A window whose
last token is a target only (lm-eval's spans are window + 1 tokens, of which the model reads
`window`) is sent without it, and that token's log-probability is the generated token's:
generation is restricted to it (allowed_token_ids), and raw log-probabilities are taken before any
restriction applies. So no prompt is longer than the window, and max_model_len = window + 1 holds
every request (vLLM refuses a prompt of max_model_len tokens, which leaves no room for the one
generated token; that token is never read by the model).

Prefix caching is off: with it, prompt log-probabilities change with the order of requests (vLLM
#42019). A group of documents' windows is submitted at once and vLLM schedules them itself
(continuous batching, chunked prefill); a batch of the group is handed back when its last window
is done, so rows are written as documents finish and memory follows the group in flight.

Outside -v, vLLM's start-up output (its log, its workers' and compilers') goes to a log file that
an error names, and its log level in this process is ERROR afterwards.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config, parse_engine_args
from ..errors import EXIT_MODEL, EXIT_NUMERIC, PplError, first_line
from .watchdog import Watchdog
from .base import Job, RequestEngine, Scored, window_sums
from .loading import bos_token_id, context_length, explain_load_error, locate

logger = logging.getLogger(__name__)
INSTALL = "pip install 'ppl-eval[vllm]' (vLLM for CUDA); on a CPU, vLLM's CPU build: see docs/engines.md"
DEFAULT_BATCH_TOKENS = 65536  # tokens a batch; a group of documents in flight holds about 8 batches


def import_vllm():
    """vLLM, its log on stderr (stdout is the results'), or a one-line error that says how to install it."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    try:
        import vllm
    except ImportError as e:
        raise PplError(f"--engine vllm needs vLLM ({first_line(e)}): {INSTALL}", EXIT_MODEL) from None
    return vllm


def verbose() -> bool:
    """-v: other libraries' output shown (ppl-eval's logger at DEBUG)."""
    return logging.getLogger("ppl_cli").isEnabledFor(logging.DEBUG)


@dataclass
class VllmModel:
    """A model for vLLM before its engine starts: where vLLM reads it, ppl-eval's own tokenizer (ppl-eval
    tokenizes; vLLM gets token ids), its configuration, and what summary.json records. `llm`: an
    engine the caller already started (evaluate(config, model=llm)), scored as it is."""

    location: str
    tokenizer: Any
    hf_config: Any
    context_length: int | None
    bos_id: int | None
    info: dict
    llm: Any = None
    temporary: list = field(default_factory=list)
    offline: bool = False  # the hub cannot be reached: vLLM reads the local cache alone
    watchdog: Watchdog | None = None  # ends the engine's processes if this one is killed (launch() starts it)

    def start(self, config: Config, window: int, keep: Sequence[str], max_batch_tokens: int | None) -> VllmEngine:
        """The engine, with room for windows of `window` tokens (max_model_len = window + 1)."""
        import vllm

        owned = self.llm is None
        llm, log = self.launch(config, window) if owned else (self.llm, None)
        model_config = llm.llm_engine.model_config
        check_model_config(model_config, window)
        self.info["dtype"] = str(model_config.dtype).removeprefix("torch.")
        parallel = llm.llm_engine.vllm_config.parallel_config
        self.info["engine"] = {
            "name": "vllm",
            "version": vllm.__version__,
            "logprobs_mode": str(model_config.logprobs_mode),
            "max_model_len": model_config.max_model_len,
            "tensor_parallel_size": parallel.tensor_parallel_size,
            "pipeline_parallel_size": parallel.pipeline_parallel_size,
            "quantization": model_config.quantization,
            "args": parse_engine_args(config.vllm_args),
            **({"started": "by the caller"} if not owned else {}),
        }
        batch_tokens = max_batch_tokens or max(DEFAULT_BATCH_TOKENS, window)
        return VllmEngine(llm, keep, batch_tokens, self.info["dtype"], self.info["vocab_size"], owned, log, self.watchdog)

    def launch(self, config: Config, window: int) -> tuple[Any, EngineLog | None]:
        """vllm.LLM for windows of `window` tokens, and the log its start-up went to (outside -v)."""
        vllm = import_vllm()
        arguments = engine_arguments(config, self, window)
        parallel = f", tensor parallel {config.tensor_parallel_size}" if config.tensor_parallel_size else ""
        logger.info("starting vLLM %s for %s%s%s", vllm.__version__, config.model, parallel, "" if verbose() else " (its log: -v)")
        self.watchdog = Watchdog()  # what vLLM leaves running after a start that fails is ended when this process ends
        with engine_log() as log, allowed_length(window + 1 > (self.context_length or window + 1)), offline(self.offline):
            try:
                llm = vllm.LLM(**arguments)
            except Exception as e:  # vLLM raises ValueError, RuntimeError, OOM, ... for what it cannot run
                raise PplError(start_failure(config.model, e, log), EXIT_MODEL) from None
        self.watchdog.started()
        if not verbose():
            logging.getLogger("vllm").setLevel(logging.ERROR)
        return llm, log


def open_model(config: Config) -> VllmModel:
    """Where vLLM reads config.model (a hub id, a folder, a .gguf file's de-quantized copy, the
    smollm2-135m alias's), its tokenizer and configuration, loaded here without its weights."""
    import transformers

    import_vllm()
    located = locate(config)
    source, kwargs = located.source, located.kwargs
    try:
        hf_config = transformers.AutoConfig.from_pretrained(source.location, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.location, **kwargs)
    except Exception as e:
        raise PplError(explain_load_error(config.model, e, config), EXIT_MODEL) from None
    check_weights(config, Path(source.location))
    context = context_length(hf_config)
    text_config = hf_config.get_text_config()
    info = {
        **located.origin,
        "commit": getattr(hf_config, "_commit_hash", None),
        "architecture": (getattr(hf_config, "architectures", None) or [type(hf_config).__name__])[0],
        "parameters": None,  # held by vLLM's workers
        "vocab_size": text_config.vocab_size,
        "context_length": context,
        "dtype": vllm_dtype(config.dtype, getattr(hf_config, "quantization_config", None) is not None or "quantization" in parse_engine_args(config.vllm_args)),
        "device": "vllm",
    }  # the dtype asked for (run.json's); the one vLLM runs in, once it starts
    return VllmModel(source.location, tokenizer, hf_config, context, bos_token_id(tokenizer), info, temporary=located.temporary,
                     offline=bool(kwargs.get("local_files_only")))  # fmt: skip


def check_weights(config: Config, folder: Path) -> None:
    """A local folder without the weight files vLLM would load: said now, not after its workers start."""
    if not folder.is_dir():
        return  # a hub id: vLLM downloads it
    patterns = ["*.safetensors"] + ([] if not config.allow_pickle else ["*.bin", "*.pt"])
    if not any(next(folder.glob(pattern), None) for pattern in patterns):
        loads = "" if config.allow_pickle else " (vLLM loads only safetensors here; --allow-pickle lets it read .bin files)"
        raise PplError(f"vLLM cannot run {config.model}: {folder} holds no weights ({', '.join(patterns)}){loads}", EXIT_MODEL)


def from_llm(llm, tokenizer, config: Config) -> VllmModel:
    """A vllm.LLM the caller started, with its tokenizer (or vLLM's own, where it loaded one)."""
    import transformers

    model_config = llm.llm_engine.model_config
    if tokenizer is None:
        tokenizer = llm.get_tokenizer() if not model_config.skip_tokenizer_init else None
    if tokenizer is None:
        raise PplError("a vLLM engine started with skip_tokenizer_init needs its tokenizer: evaluate(config, model=llm, tokenizer=...)")
    hf_config = model_config.hf_config if isinstance(model_config.hf_config, transformers.PretrainedConfig) else None
    context = context_length(hf_config) if hf_config is not None else model_config.max_model_len
    info = {
        "id": model_config.model, "source": "in memory (vllm.LLM)", "gguf_file": None, "kind": "in memory", "revision": model_config.revision,
        "commit": None, "architecture": model_config.architecture, "parameters": None, "vocab_size": model_config.get_vocab_size(),
        "context_length": context, "dtype": None, "device": "vllm",
    }  # fmt: skip
    return VllmModel(model_config.model, tokenizer, hf_config, context, bos_token_id(tokenizer), info, llm=llm)


def is_vllm(model) -> bool:
    """Whether a model handed to evaluate() is a vllm.LLM."""
    return type(model).__module__.split(".")[0] == "vllm"


def engine_arguments(config: Config, model: VllmModel, window: int) -> dict:
    """vllm.LLM's arguments: ppl-eval's, then the user's --vllm-arg (which cannot change those the
    log-probabilities depend on: config.parse_engine_args refuses them)."""
    quantized = getattr(model.hf_config, "quantization_config", None) is not None
    user = parse_engine_args(config.vllm_args)
    arguments = {
        "model": model.location,
        "revision": config.revision,
        "skip_tokenizer_init": True,  # ppl-eval tokenizes; vLLM gets token ids
        "dtype": vllm_dtype(config.dtype, quantized or "quantization" in user),
        "max_model_len": window + 1,
        "enable_prefix_caching": False,
        "trust_remote_code": config.trust_remote_code,
        "seed": config.seed,
        "disable_log_stats": True,
        **({"load_format": "safetensors"} if not config.allow_pickle else {}),
        **{name: getattr(config, name) for name in ("tensor_parallel_size", "pipeline_parallel_size", "gpu_memory_utilization") if getattr(config, name) is not None},
    }
    if "max_model_len" in user and user["max_model_len"] < window + 1:
        raise PplError(f"--vllm-arg max_model_len={user['max_model_len']} leaves no room for windows of {window} tokens: it must be at least {window + 1}")
    return {**arguments, **user}


def vllm_dtype(dtype: str, quantized: bool) -> str:
    """--dtype as vLLM takes it: auto is bfloat16 on CUDA and float32 elsewhere, as for the
    transformers engine; a quantized model's (auto) is what its quantization needs."""
    if dtype != "auto":
        return dtype
    if quantized:
        return "auto"
    import torch

    return "bfloat16" if torch.cuda.is_available() else "float32"


def check_model_config(model_config, window: int) -> None:
    """What the log-probabilities depend on, as the started engine has it (a caller's engine may differ)."""
    if model_config.max_model_len < window + 1:
        raise PplError(
            f"this vLLM engine's max_model_len ({model_config.max_model_len}) leaves no room for windows of {window} tokens:"
            f" start it with max_model_len={window + 1} or more, or lower --window"
        )
    if str(model_config.logprobs_mode) != "raw_logprobs":
        raise PplError(f"this vLLM engine returns {model_config.logprobs_mode}; ppl-eval scores raw_logprobs (the model's own log-softmax)")


class VllmEngine(RequestEngine):
    name = "vllm"
    keeps = frozenset({"nll", "rank"})  # vLLM returns a token's log-probability and rank, not the distribution

    def __init__(self, llm, keep: Sequence[str], max_batch_tokens: int, dtype: str, vocab: int, owned: bool, log: EngineLog | None, watchdog: Watchdog | None):
        """`owned`: the engine was started here, and is shut down by close() (a caller's is left running),
        which then stands `watchdog` down."""
        from vllm import SamplingParams

        self.llm, self.engine = llm, llm.llm_engine
        self.keep = tuple(k for k in keep if k in self.keeps)
        self.max_batch_tokens, self.dtype, self.vocab, self.owned, self.log, self.watchdog = max_batch_tokens, dtype, vocab, owned, log, watchdog
        flat = "flat_logprobs" in getattr(SamplingParams, "__struct_fields__", ())  # fewer Python objects (vLLM 0.12 and later)
        self.params = dict(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False, **({"flat_logprobs": True} if flat else {}))
        self.SamplingParams = SamplingParams
        self.requests = itertools.count()
        check_cache_config(self.engine)

    def stream(self, jobs: Sequence[Job], batches: list[list[int]], stop=None) -> Iterator[tuple[list[int], list[Scored]]]:
        """Every batch's requests submitted at once; each batch handed back when its last is done.
        stop.check() between engine steps; requests still in flight are aborted on the way out."""
        where: dict[str, tuple[int, int]] = {}  # request id -> (batch, position in it)
        results: list[list[Scored | None]] = [[None] * len(batch) for batch in batches]
        left = [len(batch) for batch in batches]
        try:
            for k, batch in enumerate(batches):
                for p, i in enumerate(batch):
                    request = str(next(self.requests))
                    prompt, params = self.request(jobs[i])
                    self.engine.add_request(request, prompt, params)
                    where[request] = (k, p)
            while where:
                if stop is not None:
                    stop.check()
                for out in self.step(stop):
                    if not out.finished or out.request_id not in where:
                        continue
                    k, p = where.pop(out.request_id)
                    results[k][p] = self.scored(jobs[batches[k][p]], out)
                    left[k] -= 1
                    if not left[k]:
                        yield batches[k], results[k]
        finally:
            if where:
                self.abort(list(where))

    def request(self, job: Job) -> tuple[dict, Any]:
        """A window as a token prompt: what the model reads; a last token it does not read (a target
        only) is the generated token, restricted to it, whose raw log-probability vLLM returns."""
        tokens = job.tokens.tolist()
        params = self.params
        if job.reads < len(tokens):
            params = {**params, "logprobs": 0, "allowed_token_ids": [tokens[-1]]}
        return {"prompt_token_ids": tokens[: job.reads]}, self.SamplingParams(**params)

    def step(self, stop) -> list:
        try:
            return self.engine.step()
        except Exception as e:  # the engine's processes died: out of memory, a crash, or a Ctrl-C they got too
            if stop is not None:
                stop.check()
            message = engine_failure(e, self.log)
            self.log = None  # named in the error: kept
            raise PplError(message, EXIT_MODEL) from None

    def scored(self, job: Job, out) -> Scored:
        """A finished request's scored tokens: prompt positions context .. reads - 1, then the generated token where it is one."""
        prompt = out.prompt_logprobs
        if hasattr(prompt, "start_indices"):  # FlatLogprobs: one entry a position with prompt_logprobs=0, none for the first
            logprobs, ranks, ids = prompt.logprobs[job.context - 1 :], prompt.ranks[job.context - 1 :], prompt.token_ids[job.context - 1 :]
        else:
            tokens = job.tokens.tolist()
            picked = [(position[tokens[i]], tokens[i]) for i, position in enumerate(prompt) if i >= job.context and position is not None]
            logprobs, ranks, ids = [e.logprob for e, _ in picked], [e.rank for e, _ in picked], [t for _, t in picked]
        logprobs, ranks, ids = list(logprobs), list(ranks), list(ids)
        if job.reads < len(job.tokens):
            sample = out.outputs[0].logprobs
            first = sample[0] if not hasattr(sample, "start_indices") else None
            if first is not None:
                [(token, entry)] = [(t, e) for t, e in first.items() if t == int(job.tokens[-1])]
                logprobs.append(entry.logprob), ranks.append(entry.rank), ids.append(token)
            else:
                logprobs.append(sample.logprobs[0]), ranks.append(sample.ranks[0]), ids.append(sample.token_ids[0])
        expected = job.tokens[job.context :].numpy()
        if len(ids) != len(expected) or not np.array_equal(np.asarray(ids), expected):
            raise PplError(f"vLLM returned log-probabilities for {len(ids)} tokens of a window that scores {len(expected)}, or for other tokens", EXIT_MODEL)
        nll = -np.asarray(logprobs, dtype=np.float64)
        if not np.isfinite(nll).all():
            raise PplError(f"non-finite log-probability from vLLM in {self.dtype} (overflow?); rerun with --dtype float32", EXIT_NUMERIC)
        kept = {"nll": nll.astype(np.float32), "token_id": expected.astype(np.int64)}
        if "rank" in self.keep:
            kept["rank"] = np.asarray(ranks, dtype=np.int64)
        return Scored(window_sums(nll), kept)

    def abort(self, requests: list[str]) -> None:
        try:
            self.engine.abort_request(requests)
        except Exception:  # an engine already gone has nothing in flight
            pass

    def vocab_size(self) -> int:
        return self.vocab

    def close(self) -> None:
        """Shut down an engine started here: its worker processes exit, and the engine object and
        its threads go now (still alive when the interpreter exits, they abort it); its log with it."""
        if self.owned:
            core = getattr(self.engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
                thread = getattr(core, "output_queue_thread", None)  # told to stop by shutdown; it must be gone before the
                if thread is not None:  # interpreter's teardown, or freeing its last outputs there aborts the process
                    thread.join(timeout=10)
            self.owned = False
            self.llm = self.engine = None
            gc.collect()
            if self.watchdog is not None:
                self.watchdog.done()
        if self.log is not None:
            self.log.discard()


def check_cache_config(engine) -> None:
    cache = getattr(getattr(engine, "vllm_config", None), "cache_config", None)
    if cache is not None and getattr(cache, "enable_prefix_caching", False):
        raise PplError("this vLLM engine caches prefixes, and then prompt log-probabilities change with the order of requests (vLLM #42019): start it with enable_prefix_caching=False")


class EngineLog:
    """A file that vLLM's start-up output goes to, outside -v: named in errors, removed once done."""

    def __init__(self):
        handle, self.path = tempfile.mkstemp(prefix="ppl-eval-vllm-", suffix=".log")
        os.close(handle)

    def cause(self) -> str | None:
        """The last exception line in the log (a worker's root cause), without a process prefix."""
        try:
            text = open(self.path, encoding="utf-8", errors="replace").read()
        except OSError:
            return None
        found = re.findall(r"^(?:\([^)]*pid=\d+\)\s*)?((?:[\w.]+\.)?\w*(?:Error|Exception)\b(?::.*)?)$", text, re.MULTILINE)
        return found[-1].strip() if found else None

    def discard(self) -> None:
        try:
            os.unlink(self.path)
        except OSError:
            pass


@contextmanager
def engine_log() -> Iterator[EngineLog | None]:
    """Outside -v, this process's stdout and stderr (and so the worker processes vLLM starts, which
    inherit them) go to an EngineLog while the engine starts."""
    if verbose():
        yield None
        return
    log = EngineLog()
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    target = os.open(log.path, os.O_WRONLY | os.O_APPEND)
    try:
        os.dup2(target, 1), os.dup2(target, 2)
        yield log
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)


@contextmanager
def allowed_length(longer: bool) -> Iterator[None]:
    """A window as long as the model's context needs max_model_len one longer, which vLLM allows
    only with VLLM_ALLOW_LONG_MAX_MODEL_LEN=1; the extra position holds the one generated token,
    which the model never reads."""
    with environment({"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"} if longer else {}):
        yield


@contextmanager
def offline(cached_only: bool) -> Iterator[None]:
    """The hub cannot be reached but the model is cached: vLLM reads the cache alone."""
    with environment({"HF_HUB_OFFLINE": "1"} if cached_only else {}):
        yield


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Variables set while vLLM starts (its processes inherit them), as they were afterwards."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def start_failure(model: str, error: Exception, log: EngineLog | None) -> str:
    """One line for an engine that would not start, with the root cause a worker logged."""
    cause = (log.cause() if log else None) or first_line(error)
    where = f" (vLLM's log: {log.path})" if log else ""
    if "memory" in cause.lower():
        return f"vLLM ran out of memory starting {model}: {cause}{where}; lower --window, raise --gpu-memory-utilization or spread the model with --tensor-parallel-size"
    return f"vLLM cannot run {model}: {cause}{where}"


def engine_failure(error: Exception, log: EngineLog | None) -> str:
    cause = (log.cause() if log else None) or first_line(error)
    where = f" (vLLM's log: {log.path})" if log else ""
    return f"vLLM's engine stopped: {cause}{where}"
