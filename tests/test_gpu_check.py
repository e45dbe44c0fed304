"""scripts/gpu_check.py in its dry run (tiny model, small sizes, CPU here), so that it cannot rot before a GPU runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_check import CHECKS, GOLDEN, Part, golden_failures  # noqa: E402


def test_a_dry_run_has_no_timeouts_and_cuts_nothing():
    """The dry run checks that the script works: its steps must not depend on the machine's speed."""
    dry, real = Part("checks", 0.0, dry=True), Part("checks", 0.0)
    assert dry.timeout() is None and dry.fits("anything", 1e9) and not dry.cut
    assert real.timeout() == 1.0 and not real.fits("anything", 1.0) and real.cut


def test_golden_failures_name_what_differs():
    golden = json.loads(GOLDEN.read_text())
    summaries = {
        "lm-eval": {metric: golden["lm-eval"][metric] for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte")},
        "hf-recipe": {"token_perplexity": golden["hf-recipe"]["exact_perplexity"] * (1 + 2e-6)},
        "llama-cpp": {"token_perplexity": golden["llama-cpp"]["perplexity"] * 1.02},  # outside llama.cpp's 1%
    }
    assert golden_failures(summaries, golden) == [f"llama-cpp token_perplexity {golden['llama-cpp']['perplexity'] * 1.02:.6g} (golden {golden['llama-cpp']['perplexity']:.6g}, within 0.01)"]


def test_the_dry_run_runs_every_part_on_cpu(tiny_llama, tmp_path):
    out = tmp_path / "check"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(out), "--dry-run", "--model", tiny_llama, "--budget", "900"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checks = {c["name"]: c for c in json.loads((out / "checks.json").read_text())}
    assert len(checks) == len(CHECKS)  # nothing cut
    passed = {"float32 equals the HF recipe", "resume after SIGKILL", "torchrun with one rank", "--save-tokens", "--reference-model"}
    assert all(checks[name]["ok"] is True for name in passed), checks
    assert all(c["ok"] is not False for c in checks.values())
    assert checks["out-of-memory halving"]["ok"] is None and "CUDA only" in checks["out-of-memory halving"]["detail"]
    measured = json.loads((out / "measurements.json").read_text())
    assert [b["label"] for b in measured["bench"]] == ["small model, window 1024, HF recipe", "llama-3.2-1b shape, lm-eval auto batch"]
    for b in measured["bench"]:
        assert "error" not in b and all(row["scored_tokens_per_s"] > 0 for row in b["rows"])
    assert [s["dtype"] for s in measured["short_documents"]] == ["float32", "bfloat16"]
    assert all(s["documents"] == 60 for s in measured["short_documents"])
    report = (out / "report.md").read_text()
    for heading in ("## Checks", "## Slow tests", "## Measurements", "## Cut for time"):
        assert heading in report
    assert "collected only (dry run)" in report and json.loads((out / "environment.json").read_text())["dry_run"] is True
    assert (out / "logs" / "torchrun-one-rank.log").is_file() and (out / "pytest-slow.log").is_file()


def test_without_cuda_a_full_run_says_to_dry_run(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the full run would start")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(tmp_path / "c")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 1 and "no CUDA device here; --dry-run" in done.stderr
