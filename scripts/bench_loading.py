"""Host memory while a model loads: peak resident memory of ppl-eval's load_model over the size of the weights.

    python scripts/bench_loading.py                 # a random Llama of about 330 MB of float32 weights
    python scripts/bench_loading.py --layers 1      # a quick check

Each measurement runs in a fresh process: the resident memory after importing torch and
transformers is the baseline, the peak (VmHWM) after load_model the top; their difference over
the checkpoint's weight bytes is the multiple reported. The checkpoint is safetensors (float32),
loaded as float32 and as bfloat16 on CPU; and with --device-map sequential.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_model(folder: Path, layers: int) -> int:
    """A random Llama (hidden 1024, vocabulary 16,000) saved as safetensors; returns its weight bytes."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(16000)} | {"<unk>": 16000}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w0", eos_token="w1")
    config = LlamaConfig(vocab_size=16001, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers, num_attention_heads=16,
                         num_key_value_heads=16, max_position_embeddings=2048, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def child(folder: str, dtype: str, device_map: str | None) -> None:
    """Load once and print the resident memory before and the peak after, in bytes."""
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from ppl_cli import Config
    from ppl_cli.engine.loading import load_model

    def resident() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def high_water() -> int:
        """This process's own peak (VmHWM): ru_maxrss would also count the RSS of the parent it was forked from."""
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    before = resident()
    lm = load_model(Config(model=folder, device="cpu", dtype=dtype, device_map=device_map))
    peak = high_water()
    print(json.dumps({"before": before, "peak": peak, "after": resident(), "parameters": lm.info["parameters"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        folder, dtype, device_map = args.child
        return child(folder, dtype, None if device_map == "-" else device_map)
    with tempfile.TemporaryDirectory() as tmp:
        weight_bytes = make_model(Path(tmp), args.layers)
        print(f"weights: {weight_bytes / 2**20:,.0f} MB (float32 safetensors)\n")
        print("| load | peak growth MB | x the weights | resident after MB |")
        print("|---|---|---|---|")
        results = []
        for dtype, device_map in (("float32", "-"), ("bfloat16", "-"), ("float32", "sequential")):
            done = subprocess.run([sys.executable, __file__, "--child", tmp, dtype, device_map], capture_output=True, text=True, check=True)
            m = json.loads(done.stdout.strip().splitlines()[-1])
            growth = m["peak"] - m["before"]
            label = f"{dtype}" + (f", --device-map {device_map}" if device_map != "-" else "")
            print(f"| {label} | {growth / 2**20:,.0f} | {growth / weight_bytes:.2f} | {(m['after'] - m['before']) / 2**20:,.0f} |")
            results.append({"load": label, "growth": growth, "multiple": growth / weight_bytes})
        print("\n" + json.dumps({"weight_bytes": weight_bytes, "results": results}))


if __name__ == "__main__":
    main()
