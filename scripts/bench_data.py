"""Measure the streamed data path: its speed, and memory and start-up that follow the work, not the corpus.

    python scripts/bench_data.py                    # the full measurement (about 20 minutes on 2 cores)
    python scripts/bench_data.py --big-mb 20 --grow-mb 2,20 --data-path-docs 20000   # a quick check

Corpora are generated in a temporary folder from the WikiText-2 files in ../shared (paragraphs as
short documents, repeated with new ids), never committed. It measures:

1. the data path alone (read + decompress + parse + tokenize with the SmolLM2 tokenizer), beside
   read + parse alone and the tokenizer alone on the same texts;
2. `--shard 0/200` of a BIG-MB .jsonl.gz corpus against a whole run of a 2 MB corpus with as many
   documents as that shard scores: peak resident memory and start-up (process wall time minus
   scoring time), same model (a 2-layer random Llama with SmolLM2's tokenizer), window and dtype;
3. whole runs of corpora of GROW-MB sizes (a 2-layer random GPT-2 with a 2,048-token BPE, fast
   enough to score 200 MB on a CPU): peak resident memory;
4. the balance of the sharding rule: scored tokens per shard, largest over mean, for several N.
Each run is a fresh process (`--child`), so each peak is its own.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BPE_VOCAB = 2048  # the small model's vocabulary: about 3 bytes a token, so 200 MB score in minutes on a CPU
WIKITEXT = [ROOT.parent / "shared" / "data" / "wikitext-2-v1" / f"wiki.{s}.tokens" for s in ("valid", "test")]


def paragraphs() -> list[str]:
    """WikiText-2 paragraphs (not headings): short documents of 100-3,000 bytes."""
    for path in WIKITEXT:
        if not path.is_file():
            sys.exit(f"bench_data: {path} is missing (../shared beside the checkout)")
    return [line.strip() for path in WIKITEXT for line in path.open(encoding="utf-8") if line.strip() and not line.startswith(" = ")]


def write_corpus(path: Path, texts: list[str], target_bytes: int, compressed_target: bool) -> int:
    """JSON Lines of the texts repeated (fresh ids) until the file (compressed or not) reaches target_bytes."""
    rng = random.Random(0)
    documents = 0
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=6) if path.suffix == ".gz" else open(path, "w", encoding="utf-8") as f:
        raw = 0
        while True:
            order = list(range(len(texts)))
            rng.shuffle(order)
            for i in order:
                line = json.dumps({"id": f"p{documents}", "text": texts[i]}) + "\n"
                f.write(line)
                documents += 1
                raw += len(line)
            size = path.stat().st_size if compressed_target else raw
            if size >= target_bytes:
                return documents


def save_models(folder: Path) -> tuple[str, str]:
    """A random 2-layer Llama with the SmolLM2 tokenizer, and a random 2-layer GPT-2 with a small BPE."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from ppl_cli.engine.loading import resolve_model

    source = resolve_model("smollm2-135m")
    smol_tokenizer = transformers.AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
        )
    )  # fmt: skip
    smol = folder / "tiny-smollm2"
    llama.save_pretrained(smol)
    smol_tokenizer.save_pretrained(smol)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(paragraphs()[:2000], trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    )
    small = folder / "tiny-bpe"
    gpt2.save_pretrained(small)
    tokenizer.save_pretrained(small)
    return str(smol), str(small)


def child(options: dict) -> None:
    """One run in this process; prints its peak RSS, its wall time since launch and its scoring time."""
    from ppl_cli import Config, evaluate

    summary = evaluate(Config(**options)).summary
    print(json.dumps({
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall_s": time.time() - float(os.environ["BENCH_LAUNCHED"]),
        "scoring_s": summary["scoring_time_s"],
        "documents": summary["documents"],
        "tokens": summary["tokens"],
        "tokens_per_second": summary["tokens_per_second"],
    }))  # fmt: skip


def run_child(**options) -> dict:
    env = {**os.environ, "BENCH_LAUNCHED": repr(time.time())}
    cmd = [sys.executable, __file__, "--child", json.dumps({"bootstrap_samples": 1000, **options})]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"bench_data: a run failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["startup_s"] = row["wall_s"] - row["scoring_s"]
    return row


def data_path(corpus: Path, limit: int) -> dict:
    """Tokens/s of read + decompress + parse + tokenize, and of the parts, on the first `limit` documents."""
    import transformers

    from ppl_cli import Config
    from ppl_cli.data.documents import DocumentStream
    from ppl_cli.data.sources import resolve_sources
    from ppl_cli.engine.conventions import Windowing
    from ppl_cli.engine.loading import resolve_model
    from ppl_cli.engine.tokenizing import Encoder, tokenize_documents

    source = resolve_model("smollm2-135m")
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    encode = Encoder(tokenizer)
    windowing = Windowing("sliding", 2048, 1024, True, 1)
    config = Config(data=str(corpus), limit=limit)

    start = time.perf_counter()
    texts = [doc.text for _, doc in DocumentStream(resolve_sources(config), config)]
    read_parse = time.perf_counter() - start

    start = time.perf_counter()
    lengths = []
    for batch in tokenize_documents(DocumentStream(resolve_sources(config), config), encode, windowing, iter(())):
        lengths += [item.length for item in batch]
    whole = time.perf_counter() - start

    start = time.perf_counter()
    for i in range(0, len(texts), 256):
        encode(texts[i : i + 256])
    alone = time.perf_counter() - start
    tokens = sum(lengths)
    return {
        "documents": len(lengths),
        "tokens": tokens,
        "bytes": sum(len(t.encode()) for t in texts),
        "data_path_tokens_per_s": tokens / whole,
        "read_parse_tokens_per_s": tokens / read_parse,
        "tokenizer_alone_tokens_per_s": tokens / alone,
        "lengths": lengths,
    }


def balance(lengths: list[int], parts: list[int]) -> dict:
    """Largest shard's scored tokens over the mean, under the rule `document d -> shard d mod N`."""
    out = {}
    for n in parts:
        totals = [sum(max(x - 1, 0) for x in lengths[i::n]) for i in range(n)]
        out[n] = max(totals) / (sum(totals) / n)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big-mb", type=float, default=400, help="Size of the compressed corpus for --shard 0/200.")
    parser.add_argument("--grow-mb", default="20,200", help="Sizes (MB of JSON Lines) of the whole-run memory corpora.")
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--data-path-docs", type=int, default=200_000, help="Documents read for the data-path rate.")
    parser.add_argument("--workdir", help="Keep the corpora and models here (default: a temporary folder).")
    parser.add_argument("--json", help="Also write the results to this file.")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    temp = None if args.workdir else tempfile.TemporaryDirectory(prefix="ppl-eval-bench-")
    work = Path(args.workdir or temp.name)
    work.mkdir(parents=True, exist_ok=True)
    texts = paragraphs()
    results: dict = {"machine": machine()}

    smol, bpe = save_models(work)
    big = work / "big.jsonl.gz"
    total_docs = write_corpus(big, texts, int(args.big_mb * 1e6), compressed_target=True)
    shard_docs = len(range(0, total_docs, args.shards))
    small = work / "small.jsonl"
    length = max(1, int(2e6 / shard_docs) - 25)  # 2 MB of JSON Lines in all
    stream = " ".join(texts)
    with open(small, "w", encoding="utf-8") as f:
        for i in range(shard_docs):
            start = (i * length) % (len(stream) - length)
            f.write(json.dumps({"id": f"s{i}", "text": stream[start : start + length]}, ensure_ascii=False) + "\n")
    results["corpora"] = {
        "big": {"bytes": big.stat().st_size, "documents": total_docs},
        "small": {"bytes": small.stat().st_size, "documents": shard_docs},
    }
    print(f"corpora: {big.stat().st_size / 1e6:.0f} MB .jsonl.gz, {total_docs:,} documents; "
          f"{small.stat().st_size / 1e6:.1f} MB .jsonl, {shard_docs:,} documents", flush=True)  # fmt: skip

    path = data_path(big, args.data_path_docs)
    lengths = path.pop("lengths")
    results["data_path"] = path
    results["balance"] = balance(lengths, [2, 8, 64, args.shards])
    print(json.dumps(results["data_path"]), flush=True)

    common = {"model": smol, "window": args.window, "dtype": "float32", "device": "cpu"}
    shard = run_child(**common, data=str(big), shard=f"0/{args.shards}", output=str(work / "out-shard"))
    whole_small = run_child(**common, data=str(small), output=str(work / "out-small"))
    results["shard_vs_small"] = {"shard": shard, "small": whole_small}
    print(json.dumps(results["shard_vs_small"]), flush=True)

    grow = {}
    for mb in [float(x) for x in args.grow_mb.split(",")]:
        corpus = work / f"grow-{mb:g}.jsonl"
        write_corpus(corpus, texts, int(mb * 1e6), compressed_target=False)
        grow[f"{mb:g}"] = run_child(model=bpe, data=str(corpus), window=256, max_batch_tokens=16384, output=str(work / f"out-grow-{mb:g}"))
        print(f"{mb:g} MB: {json.dumps(grow[f'{mb:g}'])}", flush=True)
    results["grow"] = grow
    report(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def machine() -> dict:
    import platform

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"cpus": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "python": platform.python_version()}


def report(results: dict, args) -> None:
    p = results["data_path"]
    print("\n## Data path alone (SmolLM2 tokenizer)\n")
    print("| stage | tokens/s |\n|---|---|")
    print(f"| read + decompress + parse + tokenize | {p['data_path_tokens_per_s']:,.0f} |")
    print(f"| read + decompress + parse | {p['read_parse_tokens_per_s']:,.0f} |")
    print(f"| tokenizer alone (encode_batch_fast, same texts) | {p['tokenizer_alone_tokens_per_s']:,.0f} |")
    s, w = results["shard_vs_small"]["shard"], results["shard_vs_small"]["small"]
    big, small = results["corpora"]["big"], results["corpora"]["small"]
    print(f"\n## --shard 0/{args.shards} of {big['bytes'] / 1e6:.0f} MB .jsonl.gz vs a whole run of {small['bytes'] / 1e6:.1f} MB\n")
    print("| run | documents | peak MB | start-up s | scoring s | scored tok/s |\n|---|---|---|---|---|---|")
    for name, row in ((f"shard 0/{args.shards}", s), ("whole, small corpus", w)):
        print(f"| {name} | {row['documents']:,} | {row['peak_mb']:.0f} | {row['startup_s']:.1f} | {row['scoring_s']:.1f} | {row['tokens_per_second']:,.0f} |")
    print(f"| difference | | {s['peak_mb'] - w['peak_mb']:+.0f} | {s['startup_s'] - w['startup_s']:+.1f} | | |")
    print("\n## Whole runs, peak resident memory\n\n| corpus MB | documents | peak MB |\n|---|---|---|")
    for mb, row in results["grow"].items():
        print(f"| {mb} | {row['documents']:,} | {row['peak_mb']:.0f} |")
    print("\n## Shard balance (largest shard's scored tokens / mean)\n\n| shards | largest / mean |\n|---|---|")
    for n, ratio in results["balance"].items():
        print(f"| {n} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
