"""Output directories under two writers and a full disk, rows into a pipe, and what a run records of its windows."""

import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import PROSE

import ppl_cli.output.run_directory as run_directory
from ppl_cli.cli import cli
from ppl_cli.output.locking import LOCK_NAME, OutputLock


@pytest.fixture
def corpus(tmp_path):
    """120 documents of 1-8 sentences."""
    rng = random.Random(5)
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(PROSE) for _ in range(rng.randint(1, 8)))}) + "\n" for _ in range(120)))
    return str(path)


def run_args(model, data, *extra):
    return ["run", "-q", "--model", model, "--data", data, "--window", "32", *extra]


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def comparable(summary):
    drop = {"wall_time_s", "scoring_time_s", "tokens_per_second"}
    out = {k: v for k, v in summary.items() if k not in drop}
    out["config"] = {k: v for k, v in out["config"].items() if k not in ("output", "overwrite")}
    return out


# --- one writer per output ------------------------------------------------------------------------


def test_a_second_run_into_a_held_directory_is_refused_at_once(tiny_gpt2, corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out / LOCK_NAME, str(out)):  # held by this process, as another run would hold it
        started = time.perf_counter()
        done = invoke(*run_args(tiny_gpt2, corpus, "-o", str(out)))
        assert time.perf_counter() - started < 30  # refused before the model loads, not after a wait
    assert done.exit_code == 5
    assert done.stderr.startswith(f"ppl-eval: error: {out} is being written by another ppl-eval (pid {os.getpid()} on ")
    assert len(done.stderr.splitlines()) == 1
    assert not (out / "documents.jsonl").exists() and not (out / "run.json").exists()
    assert invoke(*run_args(tiny_gpt2, corpus, "-o", str(out))).exit_code == 0  # released: the next one runs


def test_two_processes_into_one_directory_leave_every_document_once(tiny_gpt2, corpus, tmp_path):
    out = tmp_path / "shared"
    cmd = [sys.executable, "-m", "ppl_cli", *run_args(tiny_gpt2, corpus, "--max-batch-tokens", "32", "-o", str(out))]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "run.json").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.01)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    first.wait(timeout=300)
    assert first.returncode == 0, first.stderr
    assert second.returncode == 5 and "is being written by another ppl-eval" in second.stderr
    assert f"pid {first.pid} on" in second.stderr and str(out) in second.stderr
    assert [r["index"] for r in rows(out / "documents.jsonl")] == list(range(120))


def test_a_killed_writer_leaves_no_stale_lock(tiny_gpt2, corpus, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ppl_cli", *run_args(tiny_gpt2, corpus, "--max-batch-tokens", "32", "-o", str(out))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "documents.jsonl").exists() and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / LOCK_NAME).exists()  # the file stays; the lock died with the process
    done = invoke(*run_args(tiny_gpt2, corpus, "--max-batch-tokens", "32", "-o", str(out)))
    assert done.exit_code == 0, done.output
    assert [r["index"] for r in rows(out / "documents.jsonl")] == list(range(120))


def test_merge_and_select_take_the_same_lock(tiny_gpt2, corpus, tmp_path):
    for i in range(2):
        assert invoke(*run_args(tiny_gpt2, corpus, "--shard", f"{i}/2", "-o", str(tmp_path / f"s{i}"))).exit_code == 0
    merged = tmp_path / "merged"
    merged.mkdir()
    with OutputLock(merged / LOCK_NAME, str(merged)):
        done = invoke("merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "-o", str(merged))
    assert done.exit_code == 5 and f"{merged} is being written by another ppl-eval" in done.stderr
    assert invoke("merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "-o", str(merged)).exit_code == 0

    buckets = tmp_path / "buckets"
    buckets.mkdir()
    with OutputLock(buckets / LOCK_NAME, str(buckets)):
        done = invoke("select", str(merged), "--buckets", "30,60", "-o", str(buckets))
    assert done.exit_code == 5 and "is being written by another ppl-eval" in done.stderr and not (buckets / "head.jsonl").exists()
    kept = tmp_path / "kept.jsonl"
    with OutputLock(tmp_path / ".kept.jsonl.lock", str(kept)):
        done = invoke("select", str(merged), "--keep", "low", "--keep-fraction", "0.5", "-o", str(kept))
    assert done.exit_code == 5 and f"{kept} is being written" in done.stderr and not kept.exists()
    assert invoke("select", str(merged), "--keep", "low", "--keep-fraction", "0.5", "-o", str(kept)).exit_code == 0
    assert len(kept.read_text().splitlines()) == 60 and not (tmp_path / ".kept.jsonl.lock").exists()  # a file's lock goes with it


# --- write errors ---------------------------------------------------------------------------------


def mount_small_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


class FillingDisk:
    """A fault injected into the run directory's appends: after `room` bytes a write stores part of
    what it was given and fails with ENOSPC, as a full filesystem does."""

    def __init__(self, room: int):
        self.room = room


class AppendOnly:
    """The file object append_bytes uses, with writes that fill the disk (see FillingDisk)."""

    def __init__(self, real, disk):
        self.real, self.disk = real, disk

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.real.close()

    def seek(self, *a):
        return self.real.seek(*a)

    def truncate(self, size):
        return self.real.truncate(size)

    def fileno(self):
        return self.real.fileno()

    def write(self, data):
        if self.disk.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = min(len(data), self.disk.room)
        self.disk.room -= n
        self.real.write(bytes(data[:n]))
        if n < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return n


@pytest.mark.parametrize("disk", ["tmpfs", "injected"])
def test_a_full_disk_stops_the_run_with_one_line_and_resuming_after_making_room_gives_the_whole_run(
    tiny_gpt2, corpus, tmp_path, monkeypatch, disk
):
    reference = tmp_path / "reference"
    assert invoke(*run_args(tiny_gpt2, corpus, "--save-tokens", "-o", str(reference))).exit_code == 0
    small = tmp_path / "small"
    if disk == "tmpfs":
        if not mount_small_tmpfs(small, "96k"):
            pytest.skip("this machine does not let the test mount a tmpfs; the injected fault covers the writer")
    else:
        small.mkdir()
        filling = FillingDisk(room=20_000)
        def faulty_open(path, mode="r", **kw):
            return AppendOnly(io.open(path, mode, **kw), filling) if "a" in mode else io.open(path, mode, **kw)

        monkeypatch.setattr(run_directory, "open", faulty_open, raising=False)
    out = small / "run"
    try:
        done = invoke(*run_args(tiny_gpt2, corpus, "--save-tokens", "-o", str(out)))
        assert done.exit_code == 5, done.output
        assert done.stderr.startswith(f"ppl-eval: error: cannot write {out}/") and "No space left on device" in done.stderr
        assert "run the same command to resume" in done.stderr and len(done.stderr.splitlines()) == 1
        saved = rows(out / "documents.jsonl")  # every line whole: no torn row
        assert 0 < len(saved) < 120 and [r["index"] for r in saved] == list(range(len(saved)))
        assert not (out / "summary.json").exists()
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no half-written whole file left behind
        if disk == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=20m", str(small)], check=True)
        else:
            filling.room = 10**9
        resumed = invoke(*run_args(tiny_gpt2, corpus, "--save-tokens", "-o", str(out)))
        assert resumed.exit_code == 0, resumed.output
        assert (out / "documents.jsonl").read_text() == (reference / "documents.jsonl").read_text()
        assert comparable(json.loads((out / "summary.json").read_text())) == comparable(json.loads((reference / "summary.json").read_text()))
        import pyarrow.parquet as pq

        key = [("index", "ascending"), ("position", "ascending")]
        assert pq.read_table(out / "tokens").sort_by(key).equals(pq.read_table(reference / "tokens").sort_by(key))
    finally:
        if disk == "tmpfs":
            done = subprocess.run(["umount", str(small)], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr  # busy: the run left a file open on the full disk


def test_an_io_error_on_the_summary_names_it_and_keeps_every_document(tiny_gpt2, corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("summary.json"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    done = invoke(*run_args(tiny_gpt2, corpus, "-o", str(out)))
    assert done.exit_code == 5 and done.stderr.startswith(f"ppl-eval: error: cannot write {out / 'summary.json'}: Input/output error")
    assert len(rows(out / "documents.jsonl")) == 120 and not list(out.glob(".summary.json.*"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert invoke(*run_args(tiny_gpt2, corpus, "-o", str(out))).exit_code == 0 and (out / "summary.json").exists()


def test_a_vanished_output_directory_is_a_write_error(tiny_gpt2, corpus, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "gone"
    real_append = run_directory.RunDirectory.append

    def append_then_vanish(self, rows, side=None):
        real_append(self, rows, side)
        shutil.rmtree(self.path)

    monkeypatch.setattr(run_directory.RunDirectory, "append", append_then_vanish)
    done = invoke(*run_args(tiny_gpt2, corpus, "--max-batch-tokens", "32", "-o", str(out)))
    assert done.exit_code == 5 and "cannot write" in done.stderr and "No such file or directory" in done.stderr
    assert len(done.stderr.splitlines()) == 1


# --- rows into a pipe -----------------------------------------------------------------------------


def test_jsonl_prints_every_row_in_input_order_with_or_without_an_output(tiny_gpt2, corpus, tmp_path):
    out = tmp_path / "out"
    with_dir = invoke(*run_args(tiny_gpt2, corpus, "--jsonl", "-o", str(out)))
    assert with_dir.exit_code == 0, with_dir.output
    printed = [json.loads(line) for line in with_dir.stdout.splitlines()]
    assert printed == rows(out / "documents.jsonl") and [r["index"] for r in printed] == list(range(120))
    without = invoke(*run_args(tiny_gpt2, corpus, "--jsonl"))
    assert [json.loads(line) for line in without.stdout.splitlines()] == printed
    assert without.stderr == ""  # --quiet: no summary either
    loud = CliRunner().invoke(cli, ["run", "--model", tiny_gpt2, "--data", corpus, "--window", "32", "--jsonl"])
    assert "token perplexity" in loud.stderr and "token perplexity" not in loud.stdout.replace('"token_perplexity"', "")
    both = invoke(*run_args(tiny_gpt2, corpus, "--jsonl", "--json"))
    assert both.exit_code == 2 and "choose one" in both.stderr


def test_a_reader_that_closes_the_pipe_ends_the_run_quietly_and_it_resumes(tiny_gpt2, corpus, tmp_path):
    out = tmp_path / "piped"
    cmd = [sys.executable, "-m", "ppl_cli", *run_args(tiny_gpt2, corpus, "--max-batch-tokens", "32", "--jsonl", "-o", str(out))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = [proc.stdout.readline() for _ in range(3)]  # `| head -n 3`
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=300)
    assert proc.returncode == 141 and stderr == ""  # quiet: no traceback, no message
    assert [json.loads(line)["index"] for line in first] == [0, 1, 2]
    saved = rows(out / "documents.jsonl")
    assert len(saved) < 120 and not (out / "summary.json").exists()
    resumed = invoke(*run_args(tiny_gpt2, corpus, "--max-batch-tokens", "32", "--jsonl", "-o", str(out)))
    assert [json.loads(line)["index"] for line in resumed.stdout.splitlines()] == list(range(120))  # earlier rows too


def test_jsonl_under_torchrun_prints_the_rows_once_in_order(tiny_gpt2, corpus, tmp_path):
    out = tmp_path / "ranks"
    port = str(29500 + uuid.uuid4().int % 2000)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "ppl_cli", *run_args(tiny_gpt2, corpus, "--jsonl", "-o", str(out))]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert printed == rows(out / "documents.jsonl") and len(printed) == 120


# --- what was used is what is recorded ------------------------------------------------------------


def test_the_step_used_is_recorded_beside_the_stride_asked_for(tiny_gpt2, corpus, tmp_path):
    wide = invoke(*run_args(tiny_gpt2, corpus, "--stride", "50", "--json", "-o", str(tmp_path / "wide")))
    assert wide.exit_code == 0
    summary = json.loads(wide.stdout)
    assert summary["windowing"]["stride"] == 50 and summary["windowing"]["step"] == 31
    [warning] = wide.stderr.splitlines()
    assert warning.startswith("ppl-eval: warning: --stride 50 is not below --window 32: windows step by 31 tokens")
    narrow = invoke(*run_args(tiny_gpt2, corpus, "--stride", "31", "--json", "-o", str(tmp_path / "narrow")))
    assert json.loads(narrow.stdout)["windowing"]["step"] == 31 and narrow.stderr == ""
    assert rows(tmp_path / "wide" / "documents.jsonl") == rows(tmp_path / "narrow" / "documents.jsonl")  # the same windows
    compared = invoke("compare", str(tmp_path / "wide"), str(tmp_path / "narrow"), "--json")
    assert compared.exit_code == 0 and json.loads(compared.stdout)["token_perplexity"]["delta"] == 0
    lm_eval = invoke(*run_args(tiny_gpt2, corpus, "--convention", "lm-eval", "--stride", "8", "--json"))
    assert json.loads(lm_eval.stdout)["windowing"]["step"] == 32
    assert "--stride does not apply to --convention lm-eval" in lm_eval.stderr
    default = json.loads(invoke(*run_args(tiny_gpt2, corpus, "--json")).stdout)["windowing"]
    assert default["stride"] == 16 and default["step"] == 16


# --- a run with nothing to score ------------------------------------------------------------------


def test_nothing_to_score_is_a_data_error_but_an_empty_shard_still_merges(tiny_gpt2, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["", "  ", "\n\t"]))
    done = invoke(*run_args(tiny_gpt2, str(empty), "-o", str(tmp_path / "e")))
    assert done.exit_code == 3 and len(done.stderr.splitlines()) == 1
    assert "nothing to score in" in done.stderr and "its 3 documents are all empty or whitespace only" in done.stderr
    assert not (tmp_path / "e" / "summary.json").exists()
    assert invoke(*run_args(tiny_gpt2, str(empty))).exit_code == 3  # without -o, and the Python API raises it too

    mixed = tmp_path / "mixed.jsonl"  # shard 0 of 2 gets only the empty documents (indices 0, 2, 4)
    mixed.write_text("".join(json.dumps({"text": "" if i % 2 == 0 else PROSE[i]}) + "\n" for i in range(6)))
    for i in range(2):
        shard = invoke(*run_args(tiny_gpt2, str(mixed), "--shard", f"{i}/2", "-o", str(tmp_path / f"m{i}")))
        assert shard.exit_code == 0, shard.output
    assert json.loads((tmp_path / "m0" / "summary.json").read_text())["documents"] == 0
    merged = invoke("merge", str(tmp_path / "m0"), str(tmp_path / "m1"), "-o", str(tmp_path / "all"), "--json")
    assert merged.exit_code == 0, merged.output
    assert json.loads(merged.stdout)["documents"] == 3 and json.loads(merged.stdout)["skipped_documents"] == 3
    whole = json.loads(invoke(*run_args(tiny_gpt2, str(mixed), "--json")).stdout)
    assert comparable(json.loads(merged.stdout))["token_perplexity"] == whole["token_perplexity"]
