"""A smoke run of scripts/bench.py on a tiny model: it runs, and its numbers agree."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROSE

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


@pytest.mark.parametrize("convention,baseline_name", [("sliding", "hf-recipe"), ("lm-eval", "lm-eval-loop")])
def test_bench_smoke(tiny_llama, tmp_path, convention, baseline_name):
    data = tmp_path / "text.txt"
    data.write_text(" ".join(PROSE * 6))
    cmd = [sys.executable, str(BENCH), "--model", tiny_llama, "--data", str(data), "--window", "64", "--stride", "32"]
    done = subprocess.run([*cmd, "--convention", convention, "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    engines = [(r["engine"], r["dtype"]) for r in report["rows"]]
    assert engines == [(baseline_name, "float32"), ("ppl-eval", "float32"), ("ppl-eval", "bfloat16")]
    baseline, exact, bf16 = report["rows"]
    scored = report["tokens"] - (1 if convention == "sliding" else 0)  # lm-eval scores the first token too
    assert exact["tokens"] == baseline["tokens"] == scored
    assert abs(exact["ppl_vs_baseline"]) < 1e-5  # exact mode equals the recipe
    assert abs(bf16["ppl_vs_baseline"]) < 0.05
    for row in report["rows"]:
        assert row["scored_tokens_per_s"] > 0 and row["gflop_per_s"] > 0 and row["speedup"] > 0
