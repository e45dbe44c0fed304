"""The streamed data path: every format and compression, globs, directories, several sources,
hub streaming, bad input mid-stream, and documents that are read but never held whole."""

import bz2
import csv
import gzip
import io
import json
import lzma
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import ppl_cli.data.documents
from ppl_cli import Config, evaluate
from ppl_cli.cli import cli
from ppl_cli.data.documents import load_documents
from ppl_cli.data.formats import PARAGRAPH_BREAK, paragraphs
from ppl_cli.data.records import Document
from ppl_cli.errors import PplError

try:
    from compression import zstd
except ImportError:
    from backports import zstd

COMPRESS = {
    "": lambda data: data,
    ".gz": gzip.compress,
    ".bz2": bz2.compress,
    ".xz": lzma.compress,
    ".zst": zstd.compress,
}


def write(path, data: bytes):
    """Write `data` to path, compressed by the path's suffix."""
    suffix = next((s for s in COMPRESS if s and path.name.endswith(s)), "")
    path.write_bytes(COMPRESS[suffix](data))
    return path


def rows_of(texts):
    return [{"id": f"doc{i}", "text": t, "n": i} for i, t in enumerate(texts)]


def jsonl_bytes(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def csv_bytes(rows):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def parquet_bytes(rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer, row_group_size=4)
    return buffer.getvalue()


TABLES = {
    ".jsonl": jsonl_bytes,
    ".json": lambda rows: json.dumps(rows).encode("utf-8"),
    ".csv": csv_bytes,
    ".parquet": parquet_bytes,
}


def load(data, **options):
    return load_documents(Config(data=data, **options))


@pytest.fixture
def texts(corpus_texts):
    return [*corpus_texts, "Ünïcödé — 🙂 and a second line\nhere.", "  "]  # non-ASCII, and an empty document


@pytest.mark.parametrize("compression", list(COMPRESS))
@pytest.mark.parametrize("suffix", list(TABLES))
def test_every_table_format_and_compression_gives_the_same_documents(tmp_path, texts, suffix, compression):
    rows = rows_of(texts)
    path = write(tmp_path / f"corpus{suffix}{compression}", TABLES[suffix](rows))
    expected = [Document(r["id"], r["text"]) for r in rows]
    assert load(str(path), id_field="id") == expected


@pytest.mark.parametrize("compression", list(COMPRESS))
def test_text_and_wikitext_files_compressed_equal_plain(tmp_path, texts, compression):
    from conftest import WIKITEXT_VALID

    text = "\n\n".join(texts).encode("utf-8")
    plain = write(tmp_path / "a.txt", text)
    packed = write(tmp_path / f"b.txt{compression}", text)
    for split in ("file", "line", "blank-line"):
        got = [d.text for d in load(str(packed), doc_split=split)]
        assert got == [d.text for d in load(str(plain), doc_split=split)] and got
    if WIKITEXT_VALID.is_file():
        raw = WIKITEXT_VALID.read_bytes()[:200_000]
        wiki = [d.text for d in load(str(write(tmp_path / "wiki.valid.tokens", raw)))]
        assert [d.text for d in load(str(write(tmp_path / f"wiki.x.tokens{compression}", raw)))] == wiki


def test_formats_and_compressions_give_the_same_scores(tiny_llama, tmp_path, texts):
    rows = rows_of(texts)
    base = ["run", "--quiet", "--json", "--model", tiny_llama, "--window", "32", "--id-field", "id", "--bootstrap-samples", "0"]

    def scores(path):
        out = tmp_path / f"out-{path.name}"
        result = CliRunner().invoke(cli, [*base, "--data", str(path), "-o", str(out)])
        assert result.exit_code == 0, result.output
        return (out / "documents.jsonl").read_text(), json.loads(result.stdout)

    reference, summary = scores(write(tmp_path / "plain.jsonl", jsonl_bytes(rows)))
    assert summary["documents"] == len(texts) - 1 and summary["skipped_documents"] == 1
    for name, data in [("c.jsonl.zst", jsonl_bytes(rows)), ("c.parquet.gz", parquet_bytes(rows)), ("c.csv.xz", csv_bytes(rows))]:
        got, other = scores(write(tmp_path / name, data))
        assert got == reference, name  # bit for bit: the same documents, tokens and batches
        assert other["nll_sum"] == summary["nll_sum"] and other["data"]["fingerprint"] == summary["data"]["fingerprint"]


def test_globs_directories_and_several_sources_keep_their_order(tmp_path, texts):
    rows = rows_of(texts)
    (tmp_path / "shards" / "b").mkdir(parents=True)
    write(tmp_path / "shards" / "a-0.jsonl.gz", jsonl_bytes(rows[:4]))
    write(tmp_path / "shards" / "a-1.jsonl", jsonl_bytes(rows[4:7]))
    write(tmp_path / "shards" / "b" / "c.jsonl.zst", jsonl_bytes(rows[7:]))
    (tmp_path / "shards" / "_SUCCESS").write_text("")  # files of unknown type are not inputs
    (tmp_path / "shards" / ".cache").mkdir()
    write(tmp_path / "shards" / ".cache" / "x.jsonl", jsonl_bytes(rows[:1]))  # hidden: skipped
    everything = [r["text"] for r in rows]
    assert [d.text for d in load(str(tmp_path / "shards"))] == everything
    assert [d.text for d in load(str(tmp_path / "shards" / "**" / "*.jsonl*"))] == everything
    assert [d.text for d in load(str(tmp_path / "shards" / "a-*"))] == everything[:7]
    docs = load((str(tmp_path / "shards" / "b"), str(tmp_path / "shards" / "a-*")))  # --data given twice
    assert [d.text for d in docs] == everything[7:] + everything[:7]
    assert [d.id for d in load(str(tmp_path / "shards"))] == [r["id"] for r in rows]  # the records' own id field
    # Without one, ids find the record again: the file (relative to what --data named) and its line.
    unnamed = [{"text": r["text"]} for r in rows]
    (tmp_path / "plain" / "b").mkdir(parents=True)
    write(tmp_path / "plain" / "a-0.jsonl.gz", jsonl_bytes(unnamed[:4]))
    write(tmp_path / "plain" / "a-1.jsonl", jsonl_bytes(unnamed[4:7]))
    write(tmp_path / "plain" / "b" / "c.jsonl.zst", jsonl_bytes(unnamed[7:]))
    assert [d.id for d in load(str(tmp_path / "plain"))][:5] == ["a-0.jsonl.gz:1", "a-0.jsonl.gz:2", "a-0.jsonl.gz:3", "a-0.jsonl.gz:4", "a-1.jsonl:1"]
    assert load(str(tmp_path / "plain" / "b"))[0].id == "c.jsonl.zst:1"


def test_cli_takes_data_several_times_and_a_quoted_glob(tiny_gpt2, tmp_path, texts):
    rows = rows_of(texts)
    write(tmp_path / "a.jsonl.gz", jsonl_bytes(rows[:5]))
    write(tmp_path / "b.jsonl.gz", jsonl_bytes(rows[5:]))
    args = ["run", "--quiet", "--json", "--model", tiny_gpt2, "--window", "32", "--bootstrap-samples", "0"]
    two = CliRunner().invoke(cli, [*args, "--data", str(tmp_path / "a.jsonl.gz"), "--data", str(tmp_path / "b.jsonl.gz")])
    glob = CliRunner().invoke(cli, [*args, "--data", str(tmp_path / "*.jsonl.gz")])
    assert two.exit_code == 0 and glob.exit_code == 0, two.output + glob.output
    a, b = json.loads(two.stdout), json.loads(glob.stdout)
    assert a["nll_sum"] == b["nll_sum"] and a["documents"] == len(texts) - 1
    assert a["data"]["files"] == 2 and a["config"]["data"] == [str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.jsonl.gz")]


def test_a_url_is_read_through_fsspec(tmp_path, texts):
    import fsspec

    with fsspec.open("memory://bucket/corpus.jsonl.gz", "wb") as f:
        f.write(gzip.compress(jsonl_bytes(rows_of(texts))))
    assert [d.text for d in load("memory://bucket/corpus.jsonl.gz")] == texts
    assert [d.text for d in load("memory://bucket/*.jsonl.gz")] == texts
    with pytest.raises(PplError, match="data not found: memory://bucket/nope.jsonl"):
        load("memory://bucket/nope.jsonl")


def test_standard_input_may_come_compressed(tiny_gpt2, texts):
    data = jsonl_bytes(rows_of(texts))
    plain = CliRunner().invoke(cli, ["run", "-q", "--json", "--model", tiny_gpt2, "--data", "-"], input=data)
    for compress in (gzip.compress, zstd.compress, bz2.compress, lzma.compress):
        packed = CliRunner().invoke(cli, ["run", "-q", "--json", "--model", tiny_gpt2, "--data", "-"], input=compress(data))
        assert packed.exit_code == 0, packed.output
        assert json.loads(packed.stdout)["nll_sum"] == json.loads(plain.stdout)["nll_sum"]


def files(root, *names):
    """Create empty files (and their folders) under root; return root."""
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    return root


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda d: files(d / "x", "a.jsonl", "b.parquet"),
         r"directory .*x holds files of several formats \(jsonl: 1 file, parquet: 1 file\); choose one with a glob"),
        (lambda d: d / "nothing-*.jsonl", "no files match"),
        (lambda d: files(d / "e", "notes.bin"), "no files of a known type in directory"),
        (lambda d: files(d, "c.jsonl.7z") / "c.jsonl.7z", "unknown file type .7z"),
    ],
)  # fmt: skip
def test_inputs_that_cannot_be_read_get_one_line(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(PplError, match=message) as e:
        load(str(path))
    assert e.value.exit_code == 3


def bad_run(model, data, out=None):
    args = ["run", "--quiet", "--model", model, "--data", str(data), "--window", "16", "--max-batch-tokens", "16"]
    return CliRunner().invoke(cli, [*args, *(["-o", str(out)] if out else [])])


@pytest.mark.parametrize(
    "name,damage,message",
    [
        ("c.jsonl.gz", lambda d: gzip.compress(d)[:-30], r"c.jsonl.gz is truncated or corrupt after line \d+: Compressed file ended"),
        ("c.jsonl.zst", lambda d: zstd.compress(d[: len(d) // 2]) + zstd.compress(d[len(d) // 2 :])[:-30],  # two frames
         r"c.jsonl.zst is truncated or corrupt after line \d+"),
        ("c.jsonl.gz", lambda d: gzip.compress(d.replace(b'{"id": "doc7"', b'{"id": doc7', 1)), "c.jsonl.gz line 8 is not JSON"),
        ("c.jsonl.xz", lambda d: lzma.compress(d.replace("🙂 and".encode(), b"\xff and", 1)), r"c.jsonl.xz line 10 is not valid UTF-8 at byte offset \d+"),
    ],
)  # fmt: skip
def test_bad_input_mid_stream_keeps_what_was_finished(tiny_llama, tmp_path, texts, name, damage, message):
    path = tmp_path / name
    path.write_bytes(damage(jsonl_bytes(rows_of(texts))))
    out = tmp_path / "out"
    result = bad_run(tiny_llama, path, out)
    assert result.exit_code == 3, result.output
    assert re.search(message, result.stderr) and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output and not (out / "summary.json").exists()
    saved = [json.loads(line)["index"] for line in (out / "documents.jsonl").read_text().splitlines()]
    assert saved == list(range(len(saved))) and len(saved) >= 3  # everything before the damage was scored and kept


def test_csv_with_a_text_field_over_the_csv_modules_limit(tiny_gpt2, tmp_path):
    big = "word " * 40_000  # 200,000 characters: more than csv's default field limit of 131,072
    (tmp_path / "big.csv").write_text(f'id,text\n1,"{big}"\n2,short\n')
    assert [len(d.text) for d in load(str(tmp_path / "big.csv"))] == [len(big), 5]
    result = CliRunner().invoke(cli, ["run", "-q", "--json", "--model", tiny_gpt2, "--data", str(tmp_path / "big.csv")])
    assert result.exit_code == 0, result.output


def test_json_lines_with_a_byte_order_mark(tmp_path, texts):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl_bytes(rows_of(texts)))
    assert [d.text for d in load(str(path))] == texts
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + csv_bytes(rows_of(texts)))
    assert [d.text for d in load(str(tmp_path / "bom.csv"))] == texts


@pytest.mark.parametrize("data", ["-", "{empty}"])
def test_empty_input_is_an_error_before_the_model_loads(tmp_path, data, monkeypatch):
    import ppl_cli.engine.loading

    (tmp_path / "empty.txt").write_bytes(b"")
    monkeypatch.setattr(ppl_cli.engine.loading, "load_model", lambda *a: pytest.fail("the model was loaded"))
    result = CliRunner().invoke(cli, ["run", "--data", data.replace("{empty}", str(tmp_path / "empty.txt"))], input=b"")
    assert result.exit_code == 3, result.output
    assert "no documents in" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_wrong_text_field_fails_before_the_model_loads(corpus_jsonl, monkeypatch):
    import ppl_cli.engine.loading

    monkeypatch.setattr(ppl_cli.engine.loading, "load_model", lambda *a: pytest.fail("the model was loaded"))
    result = CliRunner().invoke(cli, ["run", "--data", corpus_jsonl, "--text-field", "body"])
    assert result.exit_code == 3 and "line 1 has no field 'body' (fields: id, text)" in result.stderr


def test_streaming_reads_a_hub_dataset_lazily(tiny_gpt2, texts, monkeypatch):
    import datasets

    pulled = []

    def rows():
        for i, text in enumerate(texts * 50):
            pulled.append(i)
            yield {"text": text, "url": f"https://example.org/{i}"}

    calls = []

    def fake_load(dataset_id, name, split=None, streaming=False):
        calls.append((dataset_id, name, split, streaming))
        return datasets.IterableDataset.from_generator(rows) if streaming else datasets.Dataset.from_list(list(rows()))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    args = ["run", "-q", "--json", "--model", tiny_gpt2, "--data", "someone/fineweb-like", "--split", "train", "--limit", "4"]
    streamed = CliRunner().invoke(cli, [*args, "--streaming"])
    assert streamed.exit_code == 0, streamed.output
    assert calls == [("someone/fineweb-like", None, "train", True)]
    assert len(pulled) < 50  # not downloaded whole: rows are pulled as documents are needed
    pulled.clear()
    cached = CliRunner().invoke(cli, args)
    assert calls[-1][-1] is False and json.loads(cached.stdout)["nll_sum"] == json.loads(streamed.stdout)["nll_sum"]
    docs = load_documents(Config(data="someone/fineweb-like", split="train", streaming=True, limit=2))
    assert [d.id for d in docs] == ["someone/fineweb-like:train[0]", "someone/fineweb-like:train[1]"]


def test_streaming_needs_a_hub_dataset(corpus_jsonl):
    result = CliRunner().invoke(cli, ["run", "--data", corpus_jsonl, "--streaming"])
    assert result.exit_code == 2 and "--streaming applies to hub datasets" in result.stderr


def test_other_shards_records_are_never_parsed(tmp_path, texts, monkeypatch):
    path = write(tmp_path / "c.jsonl.gz", jsonl_bytes(rows_of(texts * 3)))
    parsed = []
    real = ppl_cli.data.documents.jsonl_document
    monkeypatch.setattr(ppl_cli.data.documents, "jsonl_document", lambda record, config: parsed.append(record.position) or real(record, config))
    from ppl_cli.data.documents import DocumentStream
    from ppl_cli.data.sharding import share
    from ppl_cli.data.sources import resolve_sources

    config = Config(data=str(path))
    stream = DocumentStream(resolve_sources(config), config, share("1/4"))
    got = [index for index, _ in stream]
    assert got == list(range(1, len(texts) * 3, 4)) and stream.count == len(texts) * 3
    assert parsed == [i + 1 for i in got]  # line = index + 1: only this shard's lines were parsed


@given(st.lists(st.sampled_from(["a", "b c", "", " ", "\t", "\r", "x\ry", "\u2028", "\x0c"]), max_size=14), st.booleans())
def test_paragraphs_stream_equals_splitting_the_whole_text(parts, trailing_newline):
    text = "\n".join(parts) + ("\n" if trailing_newline else "")
    lines = enumerate(io.StringIO(text, newline=""), start=1)  # split on "\n" only, as the byte reader does
    assert [p for _, p in paragraphs(lines) if p.strip()] == [p for p in PARAGRAPH_BREAK.split(text) if p.strip()]


def test_fast_tokenizer_path_equals_transformers(tiny_gpt2, tiny_llama, texts):
    from transformers import AutoTokenizer

    from ppl_cli.engine.tokenizing import Encoder

    for model in (tiny_gpt2, tiny_llama):
        tokenizer = AutoTokenizer.from_pretrained(model)
        assert Encoder(tokenizer)(texts) == tokenizer(texts, add_special_tokens=False)["input_ids"]


def test_a_resumed_run_does_not_tokenize_what_is_done(tiny_llama, tmp_path, texts, monkeypatch):
    import ppl_cli.engine.tokenizing

    path = write(tmp_path / "c.jsonl", jsonl_bytes(rows_of(texts * 4)))
    out = tmp_path / "out"
    config = Config(model=tiny_llama, data=str(path), window=16, max_batch_tokens=16, output=str(out))
    full = evaluate(config).documents
    lines = (out / "documents.jsonl").read_text().splitlines()
    (out / "summary.json").unlink()
    (out / "documents.jsonl").write_text("\n".join(lines[:30]) + "\n")  # as if killed after 30 documents
    seen = []
    real = ppl_cli.engine.tokenizing.token_ids
    monkeypatch.setattr(ppl_cli.engine.tokenizing, "token_ids", lambda encode, t, w: seen.extend(t) or real(encode, t, w))
    resumed = evaluate(config).documents
    assert resumed == full
    done_texts = {(texts * 4)[row["index"]] for row in full[:30]}
    assert len(seen) < len(texts * 4) - 25 and not set(seen) - set(texts * 4)
    assert sum(1 for t in seen if t in done_texts and t not in {(texts * 4)[r["index"]] for r in full[30:]}) == 0


def test_a_resume_takes_appended_records_and_refuses_changed_options(tiny_gpt2, tmp_path, texts):
    path = write(tmp_path / "c.jsonl", jsonl_bytes(rows_of(texts)))
    out = tmp_path / "out"
    args = ["run", "-q", "--model", tiny_gpt2, "--data", str(path), "--window", "32", "-o", str(out)]
    assert CliRunner().invoke(cli, args).exit_code == 0
    write(path, jsonl_bytes(rows_of(texts + ["one more"])))  # a growing file: the finished documents are checked, the new one scored
    again = CliRunner().invoke(cli, [*args, "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["documents"] == len(texts) and json.loads((out / "documents.jsonl").read_text().splitlines()[-1])["id"] == f"doc{len(texts)}"
    other = CliRunner().invoke(cli, [*args[:-4], "--window", "16", "-o", str(out)])
    assert other.exit_code == 5 and "different window (32, now 16)" in other.stderr


def test_python_api_reads_rows_back_instead_of_holding_them(tiny_gpt2, corpus_jsonl, tmp_path):
    result = evaluate(Config(model=tiny_gpt2, data=corpus_jsonl, window=32))  # no -o: a temporary file holds them
    assert not hasattr(result, "_rows") and result.documents_file.exists()
    first = next(result.iter_documents())
    assert first["index"] == 0 and len(result.documents) == result.summary["documents"] == 9
    kept = evaluate(Config(model=tiny_gpt2, data=corpus_jsonl, window=32, output=str(tmp_path / "o")))
    assert kept.documents_file == tmp_path / "o" / "documents.jsonl" and kept.documents == result.documents


def test_progress_bar_shows_documents_tokens_and_rate(tiny_gpt2, corpus_jsonl):
    result = CliRunner().invoke(cli, ["run", "--json", "--model", tiny_gpt2, "--data", corpus_jsonl, "--window", "32"])
    assert result.exit_code == 0
    bar = [line for line in re.split(r"[\r\n]", result.stderr) if line.startswith("scoring:")][-1]
    assert re.search(r"100%\|.*\| ([\d.]+k?)/\1 tokens, 9/9 documents, [\d.]+k? tok/s", bar), bar


MEMORY_SCRIPT = """
import json, resource, sys
from ppl_cli import Config, evaluate
evaluate(Config(model=sys.argv[1], data=sys.argv[2], window=32, max_batch_tokens=256, bootstrap_samples=200, output=sys.argv[3]))
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak_mb(model, data, out):
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, model, str(data), str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)["peak_mb"]


def test_memory_does_not_grow_with_the_corpus(tiny_gpt2, tmp_path):
    """A corpus 50x larger than a small one, both far beyond what is in flight (4 batches of 256
    documents, one group of windows), peaks within MEMORY_BOUND_MB of it."""
    from conftest import PROSE

    rows = [{"text": " ".join(PROSE[(i + k) % len(PROSE)] for k in range(i % 3 + 1))} for i in range(400)]
    write(tmp_path / "small.jsonl.gz", jsonl_bytes(rows))  # 400 documents, 60 kB of text
    write(tmp_path / "large.jsonl.gz", jsonl_bytes(rows * 50))  # 20,000 documents, 3 MB
    small = peak_mb(tiny_gpt2, tmp_path / "small.jsonl.gz", tmp_path / "o1")
    large = peak_mb(tiny_gpt2, tmp_path / "large.jsonl.gz", tmp_path / "o2")
    assert large - small < MEMORY_BOUND_MB, (small, large)
    assert sum(1 for _ in open(tmp_path / "o2" / "documents.jsonl")) == 20_000


MEMORY_BOUND_MB = 20
