"""Regenerate tests/golden/*.json by running the real peer tools on SmolLM2-135M and WikiText-2.

    python scripts/golden.py --lm-eval-python /path/to/venv/bin/python \
        --llama-perplexity /path/to/llama.cpp/build/bin/llama-perplexity

Not run in CI (it needs lm-evaluation-harness and a llama.cpp build): its output, numbers only,
is committed and tests/test_conventions.py compares ppl-eval against it.

- lm-eval: lm-evaluation-harness's own CLI (`hf` model on the GGUF, float32, max_length = window)
  on a custom task over the articles (JSONL), with its wikitext detokenizer and without it;
  per-document log-likelihoods come from --log_samples, word/byte perplexity from its results.
  Install with: python -m venv V && V/bin/pip install torch==2.13.0 'lm-eval[hf]==0.4.13' gguf accelerate
- llama-cpp: `llama-perplexity -m GGUF -f TEXT -c WINDOW -t 2` on the articles joined with "\\n\\n",
  built from the llama.cpp sources vendored in the llama-cpp-python sdist (tools/perplexity).
- hf-recipe: the code of the Hugging Face guide "Perplexity of fixed-length models", verbatim,
  on the articles joined with "\\n\\n"; also the exact per-token NLL sum of the same windows.
- llama-cpp-kl: `llama-quantize --allow-requantize --pure` makes a Q4_0 GGUF from the Q4_1 one, then
  `llama-perplexity --kl-divergence-base` on the Q4_1 model and `--kl-divergence` on the Q4_0 one
  (the same text and window). It checks that gguf-py's Q4_0 quantizer reproduces every tensor of
  that file byte for byte, so the test rebuilds the Q4_0 model in memory without llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ppl_cli import Config  # noqa: E402
from ppl_cli.data.documents import load_documents  # noqa: E402
from ppl_cli.engine.loading import SMOLLM2_FILE, resolve_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2-v1" / "wiki.valid.tokens"
OUT = ROOT / "tests" / "golden" / "smollm2-wikitext-valid.json"

TASK = """
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: {target}
process_results: !function utils.process_results
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""

UTILS = """
import re


def process_results(doc, results):
    (loglikelihood,) = results
    _words = len(re.split(r"\\s+", doc["page"]))
    _bytes = len(doc["page"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, _words),
        "byte_perplexity": (loglikelihood, _bytes),
        "bits_per_byte": (loglikelihood, _bytes),
    }
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lm-eval-python", help="a Python with lm-eval[hf] 0.4.13 installed")
    parser.add_argument("--llama-perplexity", help="the llama-perplexity binary")
    parser.add_argument("--articles", type=int, default=3)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--llama-quantize", help="the llama-quantize binary (default: beside llama-perplexity)")
    parser.add_argument("--only", choices=["hf-recipe", "llama-cpp-kl"], help="recompute one tool's values, keep the rest")
    args = parser.parse_args()

    docs = load_documents(Config(data=str(DATA), limit=args.articles))
    texts = [d.text for d in docs]
    source = resolve_model("smollm2-135m")
    gguf_path = Path(source.location) / SMOLLM2_FILE
    golden = {
        "model": "smollm2-135m",
        "data": f"first {args.articles} articles of WikiText-2 (v1) wiki.valid.tokens",
        "window": args.window,
        "stride": args.stride,
    }
    if args.only:
        golden = json.loads(OUT.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.only:
            golden["lm-eval"] = run_lm_eval(args, texts, source.location, tmp, detokenize=False)
            golden["lm-eval-detokenized"] = run_lm_eval(args, texts, source.location, tmp, detokenize=True)
            golden["llama-cpp"] = run_llama_cpp(args, texts, gguf_path, tmp)
        if args.only in (None, "llama-cpp-kl"):
            golden["llama-cpp-kl"] = run_llama_cpp_kl(args, texts, gguf_path, tmp)
    if args.only in (None, "hf-recipe"):
        golden["hf-recipe"] = run_hf_recipe(args, texts, source)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(golden, indent=2) + "\n")
    print(f"wrote {OUT}")


def run_lm_eval(args, texts, model_dir, tmp: Path, detokenize: bool) -> dict:
    name = "ppl_golden_detok" if detokenize else "ppl_golden_raw"
    tasks = tmp / f"tasks-{name}"
    tasks.mkdir()
    data = tmp / "articles.jsonl"
    data.write_text("".join(json.dumps({"page": t}) + "\n" for t in texts))
    target = "!function utils.wikitext_detokenizer" if detokenize else '"{{page}}"'
    (tasks / f"{name}.yaml").write_text(TASK.format(name=name, data=data, target=target))
    utils = UTILS
    if detokenize:  # lm-eval's own detokenizer, imported from the installed package
        utils += "\nfrom lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer  # noqa\n"
    (tasks / "utils.py").write_text(utils)
    out = tmp / f"out-{name}"
    model_args = f"pretrained={model_dir},gguf_file={SMOLLM2_FILE},dtype=float32,max_length={args.window}"
    cmd = [args.lm_eval_python, "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--tasks", name,
           "--include_path", str(tasks), "--batch_size", "1", "--device", "cpu", "--log_samples",
           "--output_path", str(out)]  # fmt: skip
    print(" ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"][name]
    samples = [json.loads(line) for line in next(out.rglob(f"samples_{name}_*.jsonl")).read_text().splitlines()]
    samples.sort(key=lambda s: s["doc_id"])
    loglikelihoods = [float(s["filtered_resps"][0]) if not isinstance(s["filtered_resps"][0], list)
                      else float(s["filtered_resps"][0][0]) for s in samples]  # fmt: skip
    return {
        "loglikelihoods": loglikelihoods,
        "word_perplexity": results["word_perplexity,none"],
        "byte_perplexity": results["byte_perplexity,none"],
        "bits_per_byte": results["bits_per_byte,none"],
    }


def run_llama_cpp(args, texts, gguf_path: Path, tmp: Path) -> dict:
    text = tmp / "joined.txt"
    text.write_text("\n\n".join(texts))
    cmd = [args.llama_perplexity, "-m", str(gguf_path), "-f", str(text), "-c", str(args.window), "-t", "2"]
    print(" ".join(cmd), file=sys.stderr)
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    log = done.stdout + done.stderr
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", log)
    chunks = re.search(r"calculating perplexity over (\d+) chunks", log)
    import gguf

    add_bos = gguf.GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.add_bos_token")
    return {
        "perplexity": float(final[1]),
        "uncertainty": float(final[2]),
        "chunks": int(chunks[1]),
        "add_bos": bool(add_bos.parts[-1][0]) if add_bos else None,  # llama.cpp's BOS rule for this GGUF
    }


KL_NUMBER = r"(-?[0-9.]+)"
KL_LINES = {  # llama-perplexity's summary lines -> keys (values in %, as printed, are divided by 100)
    "ppl": r"Mean PPL\(Q\)\s*:\s*{n}\s*±\s*{n}",
    "ppl_base": r"Mean PPL\(base\)\s*:\s*{n}\s*±\s*{n}",
    "nll_correlation": r"Cor\(ln\(PPL\(Q\)\), ln\(PPL\(base\)\)\):\s*{n}%",
    "ln_ppl_ratio": r"Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*{n}\s*±\s*{n}",
    "ppl_ratio": r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*{n}\s*±\s*{n}",
    "kld_mean": r"Mean\s+KLD:\s*{n}\s*±\s*{n}",
    "delta_p_mean": r"Mean\s+Δp:\s*{n}\s*±\s*{n} %",
    "delta_p_rms": r"RMS Δp\s*:\s*{n}\s*±\s*{n} %",
    "same_top_p": r"Same top p:\s*{n}\s*±\s*{n} %",
}
PERCENTILE_LINES = {"Maximum": "max", "99.9%": "99.9", "99.0%": "99", "95.0%": "95", "90.0%": "90", "75.0%": "75", "Median": "median",
                    "25.0%": "25", "10.0%": "10", " 5.0%": "5", " 1.0%": "1", " 0.1%": "0.1", "Minimum": "min"}  # fmt: skip


def run_llama_cpp_kl(args, texts, gguf_path: Path, tmp: Path) -> dict:
    import gguf
    import numpy as np

    quantize = args.llama_quantize or str(Path(args.llama_perplexity).with_name("llama-quantize"))
    q4_0 = tmp / "q4_0.gguf"
    subprocess.run([quantize, "--allow-requantize", "--pure", str(gguf_path), str(q4_0), "Q4_0", "2"], check=True, capture_output=True)
    base_tensors = {t.name: t for t in gguf.GGUFReader(str(gguf_path)).tensors}
    reproduced = 0
    for t in gguf.GGUFReader(str(q4_0)).tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.Q4_0:
            b = base_tensors[t.name]
            mine = gguf.quants.quantize(gguf.quants.dequantize(b.data, b.tensor_type).astype(np.float32), t.tensor_type)
            assert np.array_equal(mine.view(np.uint8).ravel(), np.asarray(t.data).view(np.uint8).ravel()), t.name
            reproduced += 1
    out = {"quantization": "Q4_0 (llama-quantize --allow-requantize --pure)", "tensors_reproduced_by_gguf_py": reproduced}
    out["rebuilt_in_memory"] = rebuilt_equals_loaded(gguf_path, q4_0)
    text = tmp / "joined.txt"
    text.write_text("\n\n".join(texts))
    base_logits = tmp / "base.kld"
    common = ["-c", str(args.window), "-t", "2", "--kl-divergence-base", str(base_logits)]
    subprocess.run([args.llama_perplexity, "-m", str(gguf_path), "-f", str(text), *common], check=True, capture_output=True)
    done = subprocess.run([args.llama_perplexity, "-m", str(q4_0), *common, "--kl-divergence"], check=True, capture_output=True, text=True)
    log = done.stdout + done.stderr
    for key, pattern in KL_LINES.items():
        found = re.search(pattern.format(n=KL_NUMBER), log)
        scale = 0.01 if pattern.endswith("%") else 1.0
        value = [round(float(found[i]) * scale, 9) for i in range(1, found.lastindex + 1)]
        out[key] = {"value": value[0], "uncertainty": value[1]} if len(value) == 2 else value[0]
    for kind, unit in (("KLD", 1.0), ("Δp", 0.01)):
        out[f"{'kld' if kind == 'KLD' else 'delta_p'}_percentiles"] = {
            key: round(float(found[1]) * unit, 9)
            for label, key in PERCENTILE_LINES.items()
            if (found := re.search(rf"^{re.escape(label)}\s+{kind}:\s*{KL_NUMBER}", log, re.M))
        }
    return out


def rebuilt_equals_loaded(base: Path, quantized: Path) -> bool:
    """tests/reference.py's requantized(base model) equals transformers' load of the quantized GGUF."""
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    from reference import requantized

    def load(path):
        return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)

    rebuilt, loaded = requantized(load(base)), load(quantized)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), loaded.state_dict().values()))
    return True


def run_hf_recipe(args, texts, source) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file, dtype=torch.float32)
    model.eval()
    device = "cpu"
    # --- the guide's code, verbatim (test["text"] -> the articles) ---
    encodings = tokenizer("\n\n".join(texts), return_tensors="pt")
    max_length = args.window
    stride = args.stride
    seq_len = encodings.input_ids.size(1)

    nll_sum = 0.0
    n_tokens = 0
    prev_end_loc = 0
    # Not in the guide: the exact per-token sum of the same windows, as the loss of each window times
    # the number of labels it really averages (float32, as the guide computes), and in float64.
    exact_nll, exact_tokens, float64_nll = 0.0, 0, 0.0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = encodings.input_ids[:, begin_loc:end_loc].to(device)
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100

        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)

            # loss is calculated using CrossEntropyLoss which averages over valid labels
            # N.B. the model only calculates loss over trg_len - 1 labels, because it internally shifts the labels
            # to the left by 1.
            neg_log_likelihood = outputs.loss

        # Accumulate the total negative log-likelihood and the total number of tokens
        num_valid_tokens = (target_ids != -100).sum().item()  # number of valid tokens in target_ids
        batch_size = target_ids.size(0)
        num_loss_tokens = num_valid_tokens - batch_size  # subtract batch_size due to internal label shift
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens

        labels = target_ids[0, 1:]
        exact_nll += neg_log_likelihood.item() * int((labels != -100).sum())
        exact_tokens += int((labels != -100).sum())
        logits = outputs.logits[0, :-1].double()
        float64_nll += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()

        prev_end_loc = end_loc
        if end_loc == seq_len:
            break

    avg_nll = nll_sum / n_tokens  # average negative log-likelihood per token
    ppl = torch.exp(avg_nll)
    # --- end of the guide's code ---
    return {
        "published_perplexity": float(ppl),
        "published_tokens": n_tokens,
        "exact_nll_sum": exact_nll,
        "exact_tokens": exact_tokens,
        "exact_perplexity": math.exp(exact_nll / exact_tokens),
        "exact_perplexity_float64_softmax": math.exp(float64_nll / exact_tokens),
        "sequence_tokens": seq_len,
    }


if __name__ == "__main__":
    main()
