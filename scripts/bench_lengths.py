"""--lengths: the one-pass curve against the separate-pass loop, on the same documents and lengths in one
run; and the memory one long window takes.

    python scripts/bench_lengths.py                                   # SmolLM2-135M, 6 WikiText-2 test articles, 512 to 4,096
    python scripts/bench_lengths.py --lengths 256:4096:256            # a sweep of 16 lengths, as YaRN's scripts run them
    python scripts/bench_lengths.py --lengths 256,512,1024 --articles 1  # quick
    python scripts/bench_lengths.py --memory 2048,8192,16384          # peak memory of one window of each length

Time: `ppl-eval run --lengths` (model loaded once before, its length probe included) against YaRN's
eval/perplexity.py loop written with plain transformers (each length in turn, each document cut to
it, one forward pass), both float32 on CPU over the same articles (those of wiki.test.tokens with
at least the largest length in tokens). Printed: the tokens each reads, the times (and the length
probe's part of the one-pass run, timed again on its own), their ratio against sum(L) / max(L), and
the largest relative difference of a document's NLL at a length between the two.

Memory: each length in a fresh process (`--memory-child`): SmolLM2 loaded, the peak resident memory
(VmHWM) reset to what is resident then, then `ppl-eval run --lengths L` on the WikiText-2 test file
read as one document; the growth of the peak is what scoring one window of L tokens costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEST = ROOT.parent / "shared" / "data" / "wikitext-2-v1" / "wiki.test.tokens"


def load_smollm2():
    """SmolLM2-135M as ppl-eval loads it, and every later load_model handed that model."""
    import ppl_cli.engine.loading as loading
    from ppl_cli import Config

    lm = loading.load_model(Config(device="cpu", dtype="float32"))
    loading.load_model = lambda config, local_rank=0, tokenizer=None: lm
    return lm


def timing(lengths: tuple[int, ...], articles: int) -> None:
    import torch
    import torch.nn.functional as F

    from ppl_cli import Config, evaluate
    from ppl_cli.data.documents import load_documents

    lm = load_smollm2()
    documents = load_documents(Config(data=str(TEST)))
    bos = lm.tokenizer.bos_token_id
    sequences = [(i, [bos, *lm.tokenizer(d.text, add_special_tokens=False).input_ids]) for i, d in enumerate(documents)]
    chosen = [(i, ids) for i, ids in sequences if len(ids) >= lengths[-1]][:articles]
    limit = chosen[-1][0] + 1
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chosen.jsonl"  # the chosen articles alone, in order
        data.write_text("".join(json.dumps({"id": documents[i].id, "text": documents[i].text}) + "\n" for i, _ in chosen))
        started = time.perf_counter()
        result = evaluate(Config(data=str(data), lengths=lengths, bootstrap_samples=0))
        one_pass = time.perf_counter() - started
    rows = result.documents
    from ppl_cli.engine.length_probe import length_dependence

    started = time.perf_counter()
    length_dependence(lm.model, lm.device, lengths[0], lengths[-1])  # what the one-pass run spent on its probe
    probe = time.perf_counter() - started
    started = time.perf_counter()
    loop: dict[int, list[float]] = {i: [] for i, _ in chosen}
    for length in lengths:  # YaRN's loop: length by length, each document cut to it
        for i, ids in chosen:
            x = torch.tensor([ids[:length]])
            with torch.inference_mode():
                logits = lm.model(x).logits[0, :-1].float()
            loop[i].append(F.cross_entropy(logits, x[0, 1:], reduction="none").double().sum().item())
    separate = time.perf_counter() - started
    worst = max(abs(a - b) / b for row, (i, _) in zip(rows, chosen) for a, b in zip(row["lengths"]["nll"], loop[i]))
    n = len(chosen)
    print(f"SmolLM2-135M float32, CPU ({torch.get_num_threads()} threads); {n} WikiText-2 test articles of the first {limit} with >= {lengths[-1]:,} tokens\n")
    shown = ",".join(map(str, lengths)) if len(lengths) <= 6 else f"{lengths[0]}:{lengths[-1]}:{lengths[1] - lengths[0]} ({len(lengths)} lengths)"
    print("| lengths | tokens read: one pass + probe | separate passes | one pass (s) | of which the probe | separate (s) | speed-up | without the probe | sum(L) / max(L) | largest relative difference |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {shown} | {n * lengths[-1]:,} + {lengths[0] + lengths[-1]:,} | {n * sum(lengths):,} | {one_pass:.1f} | {probe:.1f} |"
        f" {separate:.1f} | {separate / one_pass:.2f}x | {separate / (one_pass - probe):.2f}x | {sum(lengths) / lengths[-1]:.2f} | {worst:.1e} |"
    )
    print("\n" + json.dumps({"lengths": lengths, "articles": n, "one_pass_s": one_pass, "probe_s": probe, "separate_s": separate, "worst_relative": worst}))


def high_water(reset: bool = False) -> int:
    """This process's own peak resident memory (VmHWM), in bytes; `reset` first brings the peak down
    to what is resident now (Linux: 5 into /proc/self/clear_refs), so loading's peak is left out."""
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def memory_child(length: int) -> None:
    from ppl_cli import Config, evaluate

    load_smollm2()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "joined.txt"
        data.write_text(TEST.read_text(encoding="utf-8"), encoding="utf-8")  # one document of about 300,000 tokens
        before = high_water(reset=True)
        started = time.perf_counter()
        result = evaluate(Config(data=str(data), lengths=(length,), allow_beyond_context=True, bootstrap_samples=0))
        seconds = time.perf_counter() - started
    print(json.dumps({"length": length, "before": before, "peak": high_water(), "seconds": seconds, "documents": result.summary["documents"]}))


def memory(lengths: tuple[int, ...]) -> None:
    print("| length | peak growth while scoring (MB) | time (s) |")
    print("|---|---|---|")
    for length in lengths:
        done = subprocess.run([sys.executable, __file__, "--memory-child", str(length)], capture_output=True, text=True, check=True)
        m = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| {length:,} | {(m['peak'] - m['before']) / 2**20:,.0f} | {m['seconds']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,1024,2048,4096")
    parser.add_argument("--articles", type=int, default=6)
    parser.add_argument("--memory", help="lengths whose one-window memory to measure instead, e.g. 2048,8192")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.memory_child:
        return memory_child(args.memory_child)
    if args.memory:
        return memory(tuple(int(x) for x in args.memory.split(",")))
    from ppl_cli.config import parse_lengths

    timing(parse_lengths(args.lengths), args.articles)


if __name__ == "__main__":
    main()
