"""How good is a sampled run's estimate? Score a corpus whole once, then, for many seeds, compute what
`--sample-per-group N` (and `--sample F`) would report from the same rows, and compare with the
full answer: the coverage of the 95% intervals, the error and the interval width.

    python scripts/bench_sampling.py                          # SmolLM2-135M, bfloat16, WikiText-2 validation paragraphs
    python scripts/bench_sampling.py --model TINY_DIR --dtype float32 --seeds 50    # a quick check

The corpus: every paragraph (a line of 200+ characters) of the WikiText-2 validation file in
../shared, one document each, grouped by its article (60 groups). The sampled estimates are computed
by ppl-eval's own summary code from the full run's rows, exactly as a sampled run computes them
(tests/test_domains.py checks that a real sampled run scores the same sample).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ppl_cli import Config, evaluate  # noqa: E402
from ppl_cli.data.sampling import per_group_plan, sample_key, share_plan  # noqa: E402
from ppl_cli.engine.conventions import Windowing  # noqa: E402
from ppl_cli.output.summary import build_summary  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "wikitext-2-v1" / "wiki.valid.tokens"


def corpus(folder: Path) -> Path:
    """WikiText-2 validation paragraphs as JSON Lines, grouped by article title."""
    from ppl_cli.data.documents import load_documents

    path = folder / "paragraphs.jsonl"
    with open(path, "w", encoding="utf-8") as out:
        for article in load_documents(Config(data=str(DATA))):
            for line in article.text.split("\n"):
                if len(line) >= 200 and not line.lstrip().startswith("="):
                    out.write(json.dumps({"text": line.strip(), "article": article.id}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--per-group", type=int, default=10)
    parser.add_argument("--share", type=float, default=0.25)
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--bootstrap-samples", type=int, default=1000)
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--keep", help="a folder for the corpus and the full run: kept, and reused when it holds them")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        data = folder / "paragraphs.jsonl" if (folder / "paragraphs.jsonl").exists() else corpus(folder)
        config = Config(model=args.model, dtype=args.dtype, data=str(data), window=args.window, group_by="article",
                        bootstrap_samples=args.bootstrap_samples, output=str(folder / "full"))  # fmt: skip
        result = evaluate(config, progress=True)  # resumed: nothing to score when the folder holds the finished run
        full, rows = result.summary, result.documents
        groups = [(row["index"], row["group"]) for row in rows]
        n_docs = full["data"]["documents"]
        results = {"documents": n_docs, "groups": len(full["groups"]), "tokens": full["tokens"], "model": args.model, "dtype": args.dtype}
        windowing = Windowing.from_description(full["windowing"])
        for mode in ("per-group", "share"):
            stats = {"corpus": [], "groups": [], "macro": []}
            for seed in range(args.seeds):
                if mode == "per-group":
                    plan = per_group_plan(groups, args.per_group, seed)
                    kept = [row for row in rows if row["index"] in plan.chosen]
                else:
                    plan = share_plan(args.share, seed)
                    kept = [row for row in rows if sample_key(row["index"], seed) < args.share]
                sampled_config = config.replace(seed=seed, sample_per_group=args.per_group if mode == "per-group" else None,
                                                sample=args.share if mode == "share" else None)  # fmt: skip
                data_info = {"documents": n_docs, "sampling": plan.describe()}
                timings = {"wall_time_s": 0, "scoring_time_s": 0, "scored_now": 0}
                summary = build_summary(sampled_config, kept, {}, full["model"], data_info, windowing, timings)
                stats["corpus"].append(judge(summary["estimate"], full["token_perplexity"]))
                stats["macro"].append(judge(summary["macro"], full["macro"]["token_perplexity"]))
                for name, group in summary["groups"].items():
                    if group["token_perplexity"] is not None:
                        stats["groups"].append(judge(group, full["groups"][name]["token_perplexity"]))
            results[mode] = {level: summarise(values) for level, values in stats.items()}
            results[mode]["scored_documents"] = len(kept)
        print(json.dumps(results, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def judge(estimate: dict, truth: float) -> tuple[bool, float, float]:
    """(the interval covers the truth, the relative error, the interval's width relative to the truth)."""
    low, high = estimate["bootstrap"]["token_perplexity"]
    return low <= truth <= high, abs(estimate["token_perplexity"] / truth - 1), (high - low) / truth


def summarise(values: list[tuple[bool, float, float]]) -> dict:
    covered, error, width = (np.array(column, dtype=float) for column in zip(*values))
    return {"estimates": len(values), "coverage": float(covered.mean()), "median_error": float(np.median(error)), "median_width": float(np.median(width))}


if __name__ == "__main__":
    main()
