"""Regenerate tests/golden/minicons-words.json: minicons 0.3.39's corrected word surprisals.

    python scripts/golden_words.py                              # makes its own venv with minicons (pip, torch from this disk)
    python scripts/golden_words.py --minicons-python V/bin/python

minicons' `IncrementalLMScorer(model, tokenizer=...).word_score_tokenized(texts, bow_correction=True,
surprisal=True, tokenize_function=str.split, bos_token=True)` on WikiText-2 validation sentences,
with SmolLM2-135M (the GGUF, de-quantized, float32; its tokenizer is GPT-2 style byte-level BPE)
and with the tests' seeded tiny GPT-2 (1,024 positions); and the same with bow_correction=False. The sentences and
every word's surprisal (nats) are stored; tests/test_words.py compares ppl-eval --save-words with
them. Not run in CI: its output, numbers only, is committed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

DATA = ROOT.parent / "shared" / "data" / "wikitext-2-v1" / "wiki.valid.tokens"
OUT = ROOT / "tests" / "golden" / "minicons-words.json"
SENTENCES = 24

RUN_MINICONS = textwrap.dedent(
    """
    import json, sys, torch, transformers
    from minicons import scorer
    folder, gguf, texts = sys.argv[1], sys.argv[2] or None, json.loads(sys.stdin.read())
    kwargs = {"gguf_file": gguf} if gguf else {}
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    lm = scorer.IncrementalLMScorer(model, device="cpu", tokenizer=tokenizer)
    out = {}
    for name, correct in (("corrected", True), ("plain", False)):
        scored = lm.word_score_tokenized(texts, bow_correction=correct, surprisal=True, tokenize_function=str.split, bos_token=True)
        out[name] = [[float(s) for _, s in words] for words in scored]
        out["words"] = [[w for w, _ in words] for words in scored]
    import minicons.scorer as m, importlib.metadata as md
    out["versions"] = {p: md.version(p) for p in ("minicons", "torch", "transformers")}
    print(json.dumps(out))
    """
)


def sentences() -> list[str]:
    """WikiText-2 validation sentences of 8 to 40 words, evenly spread over the file."""
    found = []
    for line in DATA.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.strip().startswith("="):
            found += [s.strip() + " ." for s in re.split(r" \. ", line.strip().removesuffix(" .")) if 8 <= len(s.split()) <= 40]
    step = len(found) // SENTENCES
    return found[::step][:SENTENCES]


def minicons_venv(folder: Path) -> str:
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    pip = [str(folder / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "minicons==0.3.39", "transformers", "gguf", "accelerate"], check=True)
    return str(folder / "bin" / "python")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minicons-python", help="a Python with minicons 0.3.39 installed (default: a fresh venv)")
    args = parser.parse_args()
    from conftest import save_tiny_gpt2

    from ppl_cli.engine.loading import resolve_model

    texts = sentences()
    with tempfile.TemporaryDirectory() as tmp:
        python = args.minicons_python or minicons_venv(Path(tmp) / "venv")
        smollm2 = resolve_model("smollm2-135m")
        tiny = save_tiny_gpt2(Path(tmp) / "tiny-gpt2", n_positions=1024)  # long enough for every sentence
        golden = {"what": __doc__.split("\n\n")[1].replace("\n", " "), "texts": texts}
        for name, folder, gguf in (("smollm2", smollm2.location, smollm2.gguf_file), ("tiny-gpt2", str(tiny), "")):
            done = subprocess.run([python, "-c", RUN_MINICONS, folder, gguf or ""], input=json.dumps(texts), capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            result = json.loads(done.stdout.strip().splitlines()[-1])
            golden[name] = {"texts": texts, **result}
            print(f"{name}: {sum(map(len, result['words']))} words", file=sys.stderr)
    OUT.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
