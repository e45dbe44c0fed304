"""A smoke run of scripts/bench.py on a tiny model: it runs, and its numbers agree."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROSE

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


def run_bench(model, tmp_path, *options):
    data = tmp_path / "text.txt"
    data.write_text(" ".join(PROSE * 6))
    cmd = [sys.executable, str(BENCH), "--model", model, "--data", str(data), "--window", "64", "--stride", "32"]
    done = subprocess.run([*cmd, *options, "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("convention,baseline_name", [("sliding", "hf-recipe"), ("lm-eval", "lm-eval-loop")])
def test_bench_smoke(tiny_llama, tmp_path, convention, baseline_name):
    report = run_bench(tiny_llama, tmp_path, "--convention", convention, "--lm-eval-port", "--floor", "--signals")
    engines = [(r["engine"], r["dtype"]) for r in report["rows"]]
    # bfloat16 is skipped, with the reason, on a CPU that has no fast bfloat16 matmul.
    bf16_rows = [] if "bfloat16" in report["skipped"] else [("ppl-eval", "bfloat16")]
    assert engines == [(baseline_name, "float32"), ("ppl-eval", "float32"), *bf16_rows, ("floor", "float32"), ("ppl-eval --signals", "float32")]
    signals = report["rows"].pop()  # ppl-eval computing the signals too, on the same windows
    assert signals["tokens"] == report["rows"][1]["tokens"]
    assert signals["nll_sum"] == report["rows"][1]["nll_sum"]  # entropy and z are computed beside the NLL, never changing it
    *_, floor = report["rows"]
    assert floor["perplexity"] is None and floor["tokens"] == report["rows"][0]["tokens"]
    baseline, exact, *bf16 = report["rows"][:-1]
    scored = report["tokens"] - (1 if convention == "sliding" else 0)  # lm-eval scores the first token too
    assert exact["tokens"] == baseline["tokens"] == scored
    assert abs(exact["ppl_vs_baseline"]) < 1e-5  # exact mode equals the recipe
    assert all(abs(row["ppl_vs_baseline"]) < 0.05 for row in bf16)
    for row in report["rows"]:
        assert row["scored_tokens_per_s"] > 0 and row["gflop_per_s"] > 0 and row["speedup"] > 0
        assert row["round_speedups"] == [pytest.approx(row["speedup"])]  # one round: the same ratio


def test_bench_against_real_lm_eval(tiny_llama, tmp_path):
    """Where lm-evaluation-harness is installed, the lm-eval baseline is lm-eval itself, and agrees."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install lm-eval)")
    report = run_bench(tiny_llama, tmp_path, "--convention", "lm-eval", "--dtypes", "float32")
    harness, exact = report["rows"]
    assert harness["engine"].startswith("lm-eval 0.")
    assert exact["tokens"] == harness["tokens"] == report["tokens"]
    assert abs(exact["ppl_vs_baseline"]) < 1e-5


@pytest.mark.parametrize("convention,baseline_name", [("sliding", "hf-recipe"), ("lm-eval", "lm-eval-loop")])
def test_bench_paired_smoke(tiny_llama, tmp_path, convention, baseline_name):
    """--paired: one window per engine, alternating; the baseline's own ratio is 1 every round."""
    report = run_bench(tiny_llama, tmp_path, "--convention", convention, "--lm-eval-port", "--paired", "3")
    assert [r["engine"] for r in report["rows"]] == [baseline_name, "ppl-eval", "floor"]
    assert all(len(times) == 3 for times in report["seconds"].values())
    baseline = report["rows"][0]
    assert baseline["ratio_min"] == baseline["ratio_max"] == 1.0
    assert all(r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"] for r in report["rows"])

