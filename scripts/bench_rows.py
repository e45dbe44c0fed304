"""What writing each document's row as it finishes costs, against writing them a group at a time.

    python scripts/bench_rows.py                        # SmolLM2-135M, 150 WikiText-2 paragraphs, 6 rounds
    python scripts/bench_rows.py --paragraphs 50 --rounds 2

`ppl-eval run` over WikiText-2 validation paragraphs (many short documents: the most rows a second)
with rows handed on as documents finish (FLUSH_S, the default), and with every write held to the
end of its group of batches (FLUSH_S infinite: the resume guarantee kept the other way), in one process, the
two taking turns round after round, the order reversed every other round, so that the machine's
drift over minutes falls on both alike. Printed: each one's fastest and median scoring time, the
median of the rounds' ratios (each round's two runs seconds apart), and how many writes (appends to
documents.jsonl) each made.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VALID = ROOT.parent / "shared" / "data" / "wikitext-2-v1" / "wiki.valid.tokens"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paragraphs", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    import ppl_cli.engine.loading as loading
    import ppl_cli.output.rows as rows
    from ppl_cli import Config, evaluate
    from ppl_cli.output.run_directory import RunDirectory

    lm = loading.load_model(Config(device="cpu", dtype="float32"))
    loading.load_model = lambda config, local_rank=0, tokenizer=None: lm
    appends = [0]
    append_lines = RunDirectory.append_lines

    def counted(self, stem, lines):
        appends[0] += stem == "documents"
        return append_lines(self, stem, lines)

    RunDirectory.append_lines = counted
    seconds: dict[str, list[float]] = {}
    writes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "paragraphs.jsonl"  # the articles' paragraphs, headings left out: many short documents
        paragraphs = [line.strip() for line in VALID.read_text(encoding="utf-8").splitlines() if line.strip() and not line.strip().startswith("=")]
        data.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs[: args.paragraphs]))
        intervals = (("as documents finish", rows.FLUSH_S), ("a group at a time", math.inf))
        for round_ in range(args.rounds):
            for name, interval in intervals[:: 1 if round_ % 2 == 0 else -1]:
                rows.FLUSH_S, appends[0] = interval, 0
                config = Config(data=str(data), bootstrap_samples=0, output=str(Path(tmp) / "out"), overwrite=True)
                summary = evaluate(config).summary
                seconds.setdefault(name, []).append(summary["scoring_time_s"])
                writes[name] = appends[0]
    (new, old) = (seconds[name] for name, _ in intervals)
    ratios = sorted(a / b for a, b in zip(new, old))
    print(f"SmolLM2-135M float32, {summary['documents']} WikiText-2 paragraphs, {summary['tokens']:,} tokens, {args.rounds} rounds\n")
    print("| rows written | fastest scoring (s) | median (s) | writes |")
    print("|---|---|---|---|")
    for name, _ in intervals:
        print(f"| {name} | {min(seconds[name]):.1f} | {statistics.median(seconds[name]):.1f} | {writes[name]} |")
    print(f"\nas documents finish against a group at a time, per round: median {statistics.median(ratios):.3f}x (from {ratios[0]:.3f}x to {ratios[-1]:.3f}x)")
    print("\n" + json.dumps({"seconds": seconds, "writes": writes, "ratios": ratios, "documents": summary["documents"], "tokens": summary["tokens"]}))


if __name__ == "__main__":
    main()
