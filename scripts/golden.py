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
from ppl_cli.documents import load_documents  # noqa: E402
from ppl_cli.model import SMOLLM2_FILE, resolve_model  # noqa: E402

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
    parser.add_argument("--only", choices=["hf-recipe"], help="recompute one tool's values, keep the rest")
    args = parser.parse_args()

    docs, _ = load_documents(Config(data=str(DATA), limit=args.articles))
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
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            golden["lm-eval"] = run_lm_eval(args, texts, source.location, tmp, detokenize=False)
            golden["lm-eval-detokenized"] = run_lm_eval(args, texts, source.location, tmp, detokenize=True)
            golden["llama-cpp"] = run_llama_cpp(args, texts, gguf_path, tmp)
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
