"""--shard I/N, `ppl-eval merge` and torchrun: every way of splitting gives the single run's numbers."""

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from ppl_cli.cli import cli
from ppl_cli.config import parse_shard
from ppl_cli.data.sharding import share

REL = 1e-6
SPLIT_INDEPENDENT = {"wall_time_s", "scoring_time_s", "tokens_per_second", "config", "data", "ranks", "model"}


def test_share_rule_hand_checked():
    # Shard d mod 3; within shard 1 (documents 1, 4, 7, 10, 13) every second one to rank 1.
    assert [d for d in range(15) if share("1/3")(d)] == [1, 4, 7, 10, 13]
    assert [d for d in range(15) if share("1/3", rank=1, world=2)(d)] == [4, 10]
    assert [d for d in range(5) if share(None, rank=0, world=2)(d)] == [0, 2, 4]
    # A joined convention scores its one sequence in shard 0, rank 0.
    assert share("0/4", joined=True)(7) and not share("1/4", joined=True)(0) and not share(None, 1, 2, joined=True)(0)


@given(st.integers(0, 200), st.integers(1, 9), st.integers(1, 4))
def test_shards_and_ranks_partition_the_documents_evenly(n, shards, world):
    owners = [[(i, r) for i in range(shards) for r in range(world) if share(f"{i}/{shards}", r, world)(d)] for d in range(n)]
    assert all(len(o) == 1 for o in owners)  # every document in exactly one share
    counts = [sum(o == [(i, r)] for o in owners) for i in range(shards) for r in range(world)]
    within_shard = [counts[i * world : (i + 1) * world] for i in range(shards)]
    assert max(counts[::world], default=0) - min(counts[::world], default=0) <= 1 or world > 1
    assert all(max(c) - min(c) <= 1 for c in within_shard)


@pytest.mark.parametrize("text", ["3", "2/2", "-1/4", "a/b", "1/0"])
def test_bad_shard_specs(text):
    result = CliRunner().invoke(cli, ["run", "--shard", text, "--data", "-"], input="x")
    assert result.exit_code == 2 and "--shard" in result.stderr


def run_cli(*args):
    result = CliRunner().invoke(cli, ["run", "--quiet", *args])
    assert result.exit_code == 0, result.output
    return result


def read(out):
    docs = [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]
    return docs, json.loads((out / "summary.json").read_text())


def assert_same_results(a, b):
    docs_a, summary_a = a
    docs_b, summary_b = b
    assert [d["index"] for d in docs_a] == [d["index"] for d in docs_b]
    for x, y in zip(docs_a, docs_b):
        assert x["tokens"] == y["tokens"] and x["bytes"] == y["bytes"]
        assert y["nll_sum"] == pytest.approx(x["nll_sum"], rel=REL)
    for key in summary_a.keys() - SPLIT_INDEPENDENT:
        value = summary_a[key]
        if key == "bootstrap":
            for metric in ("token_perplexity", "bits_per_byte"):
                assert summary_b[key][metric] == pytest.approx(value[metric], rel=REL)
        else:
            assert_close(summary_b[key], value, key)


def assert_close(b, a, where):
    """Equal structure and integers; floats equal up to summation order (ranks add in another order)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_close(b[key], a[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(y, x, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=REL), where
    else:
        assert b == a, where


@pytest.fixture
def single_run(tiny_llama, corpus_jsonl, tmp_path):
    out = tmp_path / "single"
    run_cli("--model", tiny_llama, "--data", corpus_jsonl, "--window", "32", "--id-field", "id", "-o", str(out))
    return read(out)


@pytest.mark.parametrize("n", [1, 2, 3, 12])  # 12 shards for 9 documents: some are empty
def test_shards_merged_equal_the_unsharded_run(tiny_llama, corpus_jsonl, tmp_path, single_run, n):
    dirs = []
    for i in range(n):
        out = tmp_path / f"shard-{i}"
        run_cli("--model", tiny_llama, "--data", corpus_jsonl, "--window", "32", "--id-field", "id",
                "--shard", f"{i}/{n}", "-o", str(out))  # fmt: skip
        dirs.append(str(out))
    merged = CliRunner().invoke(cli, ["merge", *reversed(dirs), "-o", str(tmp_path / "merged"), "--json"])
    assert merged.exit_code == 0, merged.output
    assert_same_results(single_run, read(tmp_path / "merged"))
    summary = json.loads(merged.stdout)
    assert summary["data"]["shards"] == {"count": n, "merged": list(range(n)), "missing": [], "complete": True}
    assert summary["config"]["shard"] is None


@pytest.fixture
def three_shards(tiny_llama, corpus_jsonl, tmp_path):
    dirs = []
    for i in range(3):
        out = tmp_path / f"s{i}"
        run_cli("--model", tiny_llama, "--data", corpus_jsonl, "--window", "32", "--shard", f"{i}/3", "-o", str(out))
        dirs.append(str(out))
    return dirs


def merge(*args):
    return CliRunner().invoke(cli, ["merge", *args])


def test_merge_refuses_missing_duplicate_and_foreign_shards(three_shards, tiny_llama, corpus_jsonl, tmp_path):
    s0, s1, s2 = three_shards
    out = str(tmp_path / "m")
    missing = merge(s0, s2, "-o", out)
    assert missing.exit_code == 3 and "missing shard 1/3; use --allow-partial" in missing.stderr
    duplicate = merge(s0, s1, s1, "-o", out)
    assert duplicate.exit_code == 3 and f"{s1} and {s1} hold the same folder" in duplicate.stderr
    other = tmp_path / "other"
    run_cli("--model", tiny_llama, "--data", corpus_jsonl, "--window", "48", "--shard", "1/3", "-o", str(other))
    foreign = merge(s0, str(other), s2, "-o", out)
    assert foreign.exit_code == 3 and "window differs (48 vs 32)" in foreign.stderr
    four = tmp_path / "four"
    run_cli("--model", tiny_llama, "--data", corpus_jsonl, "--window", "32", "--shard", "1/4", "-o", str(four))
    assert "split the data differently" in merge(s0, str(four), "-o", out).stderr
    unsharded = tmp_path / "unsharded"
    run_cli("--model", tiny_llama, "--data", corpus_jsonl, "--window", "32", "-o", str(unsharded))
    assert "is a whole run and" in merge(s0, str(unsharded), "-o", out).stderr and "merge the shards of each run first" in merge(s0, str(unsharded), "-o", out).stderr
    assert "is not a finished ppl-eval run" in merge(s0, str(tmp_path / "nothing"), "-o", out).stderr


def test_merge_refuses_to_count_a_document_twice(tiny_llama, corpus_jsonl, tmp_path, three_shards):
    whole = tmp_path / "whole"
    run_cli("--model", tiny_llama, "--data", corpus_jsonl, "--window", "32", "-o", str(whole))
    again = tmp_path / "again"
    run_cli("--model", tiny_llama, "--data", corpus_jsonl, "--window", "32", "--limit", "4", "-o", str(again))
    requeued = tmp_path / "s1-requeued"  # an array task run twice into two folders, both caught by a glob
    shutil.copytree(three_shards[1], requeued)
    for dirs, says in (
        ([whole, whole], f"{whole} and {whole} hold the same folder"),
        ([whole, again], f"{whole} and {again} hold the same documents"),  # the same input (--limit aside)
        ([*three_shards, requeued], f"shard 1/3 is given twice: {three_shards[1]} and {requeued}"),
    ):
        result = merge(*map(str, dirs), "-o", str(tmp_path / "m"))
        assert result.exit_code == 3 and says in result.stderr and "Traceback" not in result.output, result.output
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "something else entirely"}\n')
    third = tmp_path / "third"
    run_cli("--model", tiny_llama, "--data", str(other), "--window", "32", "-o", str(third))
    merged = merge(str(whole), str(third), "-o", str(tmp_path / "ok"))
    assert merged.exit_code == 0, merged.output
    twice = merge(str(tmp_path / "ok"), str(third), "-o", str(tmp_path / "m2"))  # a merged run and one of its own parts
    assert twice.exit_code == 3 and "the same documents (data fingerprint" in twice.stderr


def test_merge_allow_partial_reports_coverage(three_shards, tmp_path):
    s0, _, s2 = three_shards
    result = merge(s0, s2, "-o", str(tmp_path / "partial"), "--allow-partial", "--json")
    assert result.exit_code == 0, result.output
    shards = json.loads(result.stdout)["data"]["shards"]
    assert shards == {"count": 3, "merged": [0, 2], "missing": [1], "complete": False}


def torchrun(*args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "ppl_cli", "run", "--quiet", *args]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_torchrun_two_cpu_ranks_equal_the_single_process_run(tiny_llama, corpus_jsonl, tmp_path, single_run):
    out = tmp_path / "ddp"
    done = torchrun("--model", tiny_llama, "--data", corpus_jsonl, "--window", "32", "--id-field", "id",
                    "-o", str(out), "--json")  # fmt: skip
    summary = json.loads(done.stdout)  # printed once, by rank 0
    assert summary["ranks"] == 2
    assert_same_results(single_run, read(out))
    assert not list(out.glob("documents.rank-*"))

    # Resume under torchrun: as if killed, keep 4 documents; the rerun completes the same report.
    lines = (out / "documents.jsonl").read_text().splitlines()
    (out / "summary.json").unlink()
    (out / "documents.jsonl").write_text("\n".join(lines[:4]) + "\n")
    torchrun("--model", tiny_llama, "--data", corpus_jsonl, "--window", "32", "--id-field", "id", "-o", str(out))
    assert_same_results(single_run, read(out))


def test_torchrun_with_a_shard(tiny_llama, corpus_jsonl, tmp_path):
    plain, ddp = tmp_path / "plain", tmp_path / "ddp"
    run_cli("--model", tiny_llama, "--data", corpus_jsonl, "--window", "32", "--shard", "1/2", "-o", str(plain))
    torchrun("--model", tiny_llama, "--data", corpus_jsonl, "--window", "32", "--shard", "1/2", "-o", str(ddp))
    assert_same_results(read(plain), read(ddp))


def test_parse_shard():
    assert parse_shard(" 3 / 8 ") == (3, 8)


FAKE_SBATCH = """#!/usr/bin/env python3
# A stand-in for SLURM's sbatch: runs --wrap at once, once per array index, and prints a job id.
import os, subprocess, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
flags = [a for a in sys.argv[1:] if a.startswith("--") and "=" not in a]
with open(os.environ["SBATCH_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
first, last = map(int, args.get("array", "0-0").split("-"))
for task in range(first, last + 1):
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": str(task)}
    with open(args["output"].replace("%a", str(task)), "w") as out:  # the job's output goes to its log
        subprocess.run(["bash", "-c", args["wrap"]], env=env, check=True, stdout=out, stderr=out)
print(4242)
"""


def test_slurm_array_script_runs_shards_then_merge(tiny_llama, corpus_jsonl, tmp_path, single_run):
    import os
    from pathlib import Path

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    (bin_dir / "ppl-eval").write_text(f"#!/bin/sh\nexec {sys.executable} -m ppl_cli \"$@\"\n")
    (bin_dir / "ppl-eval").chmod(0o755)
    script = Path(__file__).resolve().parents[1] / "scripts" / "slurm-array.sh"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SBATCH_LOG": str(tmp_path / "sbatch.log"),
        "ENV_SETUP": "true",
        "RUN_OPTIONS": "--quiet --window 32 --id-field id",
    }
    out = tmp_path / "slurm"
    done = subprocess.run(["bash", str(script), tiny_llama, corpus_jsonl, str(out), "3"], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "sbatch.log").read_text()
    assert "--array=0-2" in log and "--dependency=afterok:4242" in log and "--requeue" in log
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("shard-")) == ["shard-0", "shard-1", "shard-2"]
    assert_same_results(single_run, read(out / "all"))


@pytest.fixture
def compressed_shards(tmp_path, corpus_texts):
    """The corpus as three compressed JSON Lines files in a folder, with an empty document."""
    import gzip

    from test_streaming import zstd

    texts = [*corpus_texts, " ", *corpus_texts[:3]]
    rows = [json.dumps({"id": f"doc{i}", "text": t}) + "\n" for i, t in enumerate(texts)]
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "part-0.jsonl.gz").write_bytes(gzip.compress("".join(rows[:5]).encode()))
    (folder / "part-1.jsonl.zst").write_bytes(zstd.compress("".join(rows[5:9]).encode()))
    (folder / "part-2.jsonl.gz").write_bytes(gzip.compress("".join(rows[9:]).encode()))
    return str(folder)


@pytest.mark.parametrize("n", [2, 5, 40])  # 40 shards: more than the 3 files and the 13 documents
def test_shards_of_a_compressed_folder_merged_equal_the_unsharded_run(tiny_llama, compressed_shards, tmp_path, n):
    common = ["--model", tiny_llama, "--data", compressed_shards, "--window", "32", "--id-field", "id"]
    run_cli(*common, "-o", str(tmp_path / "single"))
    dirs = []
    for i in range(n):
        out = tmp_path / f"shard-{i}"
        run_cli(*common, "--shard", f"{i}/{n}", "-o", str(out))
        dirs.append(str(out))
    merged = merge(*dirs, "-o", str(tmp_path / "merged"))
    assert merged.exit_code == 0, merged.output
    single, together = read(tmp_path / "single"), read(tmp_path / "merged")
    assert_same_results(single, together)
    assert together[1]["data"]["fingerprint"] == single[1]["data"]["fingerprint"]  # the shards' sums add up
    assert together[1]["skipped_documents"] == single[1]["skipped_documents"] == 1
    assert (tmp_path / "merged" / "documents.jsonl").read_text() == (tmp_path / "single" / "documents.jsonl").read_text()
    assert together[1]["bootstrap"] == single[1]["bootstrap"]  # the same rows in the same order: the same resamples


def test_torchrun_two_ranks_on_a_compressed_folder(tiny_llama, compressed_shards, tmp_path):
    common = ["--model", tiny_llama, "--data", compressed_shards, "--window", "32", "--id-field", "id"]
    run_cli(*common, "-o", str(tmp_path / "single"))
    torchrun(*common, "-o", str(tmp_path / "ddp"))
    single, ddp = read(tmp_path / "single"), read(tmp_path / "ddp")
    assert_same_results(single, ddp)
    assert ddp[1]["data"]["fingerprint"] == single[1]["data"]["fingerprint"] and ddp[1]["ranks"] == 2
    without_output = torchrun(*common, "--json", "--shard", "1/2")  # the rows pass through a temporary folder
    assert json.loads(without_output.stdout)["documents"] == len([d for d in single[0] if d["index"] % 2 == 1])
