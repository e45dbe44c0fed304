"""Quantizations compared on one model: perplexity, KL divergence to float32 and speed, each in the same run as its float32 reference.

    python scripts/bench_quantization.py                      # SmolLM2-135M, the first 3 WikiText-2 validation articles
    python scripts/bench_quantization.py --articles 1         # a quick check

Every row is `ppl-eval run --reference-model MODEL --reference-dtype float32` with the model in
that dtype or `--quantize` scheme: the reference scores the same windows in the same pass, so
the KL divergence is per token, over the whole vocabulary (see docs/comparing.md). Speed is the
scored tokens per second of the model and its reference together, so compare it with the float32
row's, which also runs both. Schemes whose package is not installed are reported, not run. A
.gguf model (the default) is saved as a float32 directory first: transformers cannot re-quantize
a .gguf file, and every row then starts from the same weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ppl_cli import Config, PplError, evaluate  # noqa: E402
from ppl_cli.engine.loading import load_model, resolve_model  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2-v1" / "wiki.valid.tokens"
ROWS = (("float32", None), ("bfloat16", None), ("float32", "torchao-int8"), ("float32", "quanto-int8"), ("float32", "bnb-8bit"),
        ("float32", "bnb-4bit"), ("float32", "quanto-int4"))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--articles", type=int, default=3)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as saved:
        if resolve_model(args.model).gguf_file:
            loaded = load_model(Config(model=args.model, device="cpu", dtype="float32"))
            del loaded.model.config.quantization_config  # the recipe of docs/models.md: the weights are plain float32 now
            loaded.model.hf_quantizer = None
            loaded.model.save_pretrained(saved)
            loaded.tokenizer.save_pretrained(saved)
            args.model = saved
        rows(args)


def rows(args: argparse.Namespace) -> None:
    results = []
    print("| model | token perplexity | vs float32 | mean KL(float32 ‖ it), nats | same top token | tok/s (with its reference) |")
    print("|---|---|---|---|---|---|")
    base = None
    for dtype, scheme in ROWS:
        label = scheme or dtype
        config = Config(model=args.model, dtype=dtype, quantize=scheme, data=str(DATA), limit=args.articles, window=args.window,
                        reference_model=args.model, reference_dtype="float32", bootstrap_samples=0)  # fmt: skip
        try:
            summary = evaluate(config).summary
        except PplError as e:
            print(f"| {label} | not run: {e} | | | | |")
            results.append({"model": label, "error": str(e)})
            continue
        ref = summary["reference"]
        base = base or summary["token_perplexity"]
        change = summary["token_perplexity"] / base - 1
        print(f"| {label} | {summary['token_perplexity']:.4f} | {change:+.2%} | {ref['kld_mean']['value']:.5f} ± {ref['kld_mean']['uncertainty']:.5f} |"
              f" {ref['same_top_p']['value']:.2%} | {summary['tokens_per_second']:.0f} |")  # fmt: skip
        results.append({"model": label, "token_perplexity": summary["token_perplexity"], "kld_mean": ref["kld_mean"], "same_top_p": ref["same_top_p"],
                         "tokens_per_second": summary["tokens_per_second"], "quantization": summary["model"].get("quantization")})  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
