"""`ppl-eval select` against a naive selection written here (sort, slice, thresholds, numpy percentiles)."""

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ppl_cli.cli import cli
from ppl_cli.commands.select import SelectConfig, select_records
from ppl_cli.config import build_config
from ppl_cli.errors import PplError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "configs" / "select").glob("*.yaml"))


def records(n=40):
    """Records with several fields in a fixed order, Unicode, repeated texts (equal scores: ties), empty ones."""
    from conftest import PROSE

    out = []
    for i in range(n):
        text = "" if i % 13 == 5 else " ".join(PROSE[(i * 3 + k) % 8] for k in range(i % 3 + 1))
        if i % 11 == 2:
            text = out[0]["text"]  # the same text as document 0: a tie
        out.append({"url": f"https://example.org/{i}", "text": text, "lang": "en", "note": f"é{i}🙂", "n": i})
    return out


@pytest.fixture(scope="module")
def scored(tiny_gpt2, tmp_path_factory):
    """A corpus scored in 3 shards, merged: the run select reads."""
    folder = tmp_path_factory.mktemp("select")
    rows = records()
    (folder / "corpus.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()))
    shards = []
    for i in range(3):
        out = folder / f"s{i}"
        args = ["run", "-q", "--model", tiny_gpt2, "--data", str(folder / "corpus.jsonl.gz"), "--window", "32", "--shard", f"{i}/3", "-o", str(out)]
        assert CliRunner().invoke(cli, args).exit_code == 0
        shards.append(str(out))
    merged = CliRunner().invoke(cli, ["merge", *shards, "-o", str(folder / "run")])
    assert merged.exit_code == 0, merged.output
    return {"run": folder / "run", "records": rows, "shards": shards, "folder": folder}


def scores(run: Path, metric="token_perplexity") -> dict[int, float]:
    return {r["index"]: r[metric] for r in map(json.loads, (run / "documents.jsonl").read_text().splitlines())}


def read_jsonl(path: Path) -> list[dict]:
    raw = path.read_bytes()
    text = gzip.decompress(raw).decode() if path.name.endswith(".gz") else raw.decode()
    return [json.loads(line) for line in text.splitlines()]


def written_indices(path: Path) -> list[int]:
    return [r["ppl_eval"]["index"] for r in read_jsonl(path)]


@pytest.mark.parametrize("band", ["low", "middle", "high"])
@pytest.mark.parametrize("fraction", [0.5, 0.1, 1.0])
def test_band_equals_a_naive_sort_and_slice(scored, tmp_path, band, fraction):
    out = tmp_path / "kept.jsonl.gz"
    select_records(SelectConfig(str(scored["run"]), str(out), keep=band, keep_fraction=fraction))
    values = scores(scored["run"])
    ranked = sorted(values, key=lambda i: (values[i], i))  # by value, ties by index
    k = math.floor(fraction * len(ranked) + 0.5)
    start = {"low": 0, "high": len(ranked) - k, "middle": (len(ranked) - k) // 2}[band]
    assert written_indices(out) == sorted(ranked[start : start + k])  # in source order


@pytest.mark.parametrize("band", ["low", "middle", "high"])
def test_a_band_after_thresholds_is_taken_among_the_documents_within_them(scored, tmp_path, band):
    out = tmp_path / "kept.jsonl"
    values = scores(scored["run"])
    limit = float(np.percentile(list(values.values()), 70))
    selection = select_records(SelectConfig(str(scored["run"]), str(out), max=limit, keep=band, keep_fraction=0.3))
    within = sorted((i for i in values if values[i] <= limit), key=lambda i: (values[i], i))
    k = math.floor(0.3 * len(within) + 0.5)
    start = {"low": 0, "high": len(within) - k, "middle": (len(within) - k) // 2}[band]
    assert written_indices(out) == sorted(within[start : start + k])
    assert selection["cut_points"]["documents"] == k and selection["cut_points"]["of"] == len(within)


def test_buckets_equal_numpy_percentiles_and_cover_the_scored_corpus(scored, tmp_path):
    selection = select_records(SelectConfig(str(scored["run"]), str(tmp_path / "b"), buckets=(30, 60)))
    values = scores(scored["run"])
    cuts = np.percentile(list(values.values()), [30, 60])
    assert selection["cut_points"]["values"] == pytest.approx(list(cuts))
    got = {name: written_indices(tmp_path / "b" / f"{name}.jsonl") for name in ("head", "middle", "tail")}
    assert got["head"] == sorted(i for i, v in values.items() if v <= cuts[0])
    assert got["middle"] == sorted(i for i, v in values.items() if cuts[0] < v <= cuts[1])
    assert got["tail"] == sorted(i for i, v in values.items() if v > cuts[1])
    assert sorted(sum(got.values(), [])) == sorted(values)  # the union is the whole scored corpus
    assert json.loads((tmp_path / "b" / "selection.json").read_text()) == selection
    assert sum(g["token_share"] for g in selection["selected"]) == pytest.approx(1.0)


def test_thresholds_on_the_metric_and_on_perplexity(scored, tmp_path):
    out = tmp_path / "clean.jsonl"
    bpb = scores(scored["run"], "bits_per_byte")
    ppl = scores(scored["run"])
    lo, hi = np.percentile(list(bpb.values()), [20, 90])
    limit = float(np.median(list(ppl.values())))
    select_records(SelectConfig(str(scored["run"]), str(out), metric="bits_per_byte", min=lo, max=hi, max_perplexity=limit))
    assert written_indices(out) == sorted(i for i in bpb if lo <= bpb[i] <= hi and ppl[i] <= limit)


def test_records_round_trip_exactly_through_every_format(scored, tmp_path):
    originals = {i: r for i, r in enumerate(scored["records"])}
    for name in ("kept.jsonl", "kept.jsonl.gz", "kept.jsonl.zst", "kept.parquet"):
        out = tmp_path / name
        select_records(SelectConfig(str(scored["run"]), str(out), keep="low", keep_fraction=1.0))
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            got = pq.read_table(out).to_pylist()
        elif name.endswith(".zst"):
            from test_streaming import zstd

            got = [json.loads(line) for line in zstd.decompress(out.read_bytes()).decode().splitlines()]
        else:
            got = read_jsonl(out)
        assert got, name
        for record in got:
            scores_ = record.pop("ppl_eval")
            assert list(record) == ["url", "text", "lang", "note", "n"]  # every field, in source order
            assert record == originals[scores_["index"]], name


def test_skipped_documents_are_reported_not_selected(scored, tmp_path):
    selection = select_records(SelectConfig(str(scored["run"]), str(tmp_path / "all.jsonl"), keep="low", keep_fraction=1.0))
    empty = sum(1 for r in scored["records"] if not r["text"].strip())
    assert selection["skipped_documents"] == empty > 0
    assert selection["scored_documents"] + empty == len(scored["records"]) == selection["documents_read"]
    assert "documents skipped by the run (empty): not selected" in CliRunner().invoke(
        cli, ["select", str(scored["run"]), "--keep", "low", "--keep-fraction", "1", "-o", str(tmp_path / "again.jsonl")]
    ).stdout


def test_stdout_and_json(scored, tmp_path):
    lines = CliRunner().invoke(cli, ["select", str(scored["run"]), "--keep", "high", "--keep-fraction", "0.1", "-o", "-"])
    assert lines.exit_code == 0, lines.output
    written = [json.loads(line) for line in lines.stdout.splitlines()]
    assert len(written) == round(0.1 * len(scores(scored["run"]))) and "high 0.1" in lines.stderr
    summary = CliRunner().invoke(cli, ["select", str(scored["run"]), "--keep", "high", "--keep-fraction", "0.1", "--json"])
    selection = json.loads(summary.stdout)
    assert selection["cut_points"]["documents"] == len(written) and selection["selected"][0]["file"] is None


def test_a_recipe_file(scored, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("keep: middle\nkeep-fraction: 0.5\nmetric: bits_per_byte\n")
    done = CliRunner().invoke(cli, ["select", str(scored["run"]), "--config", str(recipe), "-o", str(tmp_path / "m.jsonl"), "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["criteria"]["metric"] == "bits_per_byte"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    config = build_config(str(path), SelectConfig, run="results/x")
    assert isinstance(config, SelectConfig)


def test_partial_runs_are_refused_unless_allowed(scored, tmp_path):
    partial = tmp_path / "partial"
    assert CliRunner().invoke(cli, ["merge", *scored["shards"][:2], "-o", str(partial), "--allow-partial"]).exit_code == 0
    refused = CliRunner().invoke(cli, ["select", str(partial), "--keep", "low", "--keep-fraction", "1", "-o", str(tmp_path / "x.jsonl")])
    assert refused.exit_code == 3 and "partial merge: shards 2/3 are missing; --allow-partial" in refused.stderr
    allowed = select_records(SelectConfig(str(partial), str(tmp_path / "y.jsonl"), keep="low", keep_fraction=1.0, allow_partial=True))
    assert allowed["not_scored_documents"] == len(range(2, 40, 3)) and allowed["partial"]
    one_shard = CliRunner().invoke(cli, ["select", scored["shards"][0], "--keep", "low", "--keep-fraction", "1"])
    assert one_shard.exit_code == 3 and "is one shard (0/3)" in one_shard.stderr


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--keep", "low", "--keep-fraction", "0"], 2, "--keep-fraction must be in (0, 1]"),
        (["--keep", "low", "--keep-fraction", "1.5"], 2, "--keep-fraction must be in (0, 1]"),
        (["--buckets", "60,30", "-o", "b"], 2, "--buckets must be increasing percentiles"),
        (["--buckets", "30,x", "-o", "b"], 2, "--buckets must be percentiles separated by commas"),
        (["--metric", "loss", "--keep", "low", "--keep-fraction", "1"], 2, "Invalid value for '--metric'"),
        (["--keep", "low"], 2, "--keep-fraction must be in (0, 1]"),
        (["--max", "3", "--buckets", "30,60", "-o", "b"], 2, "or --buckets alone; given: thresholds and --buckets"),
        ([], 2, "choose a criterion"),
        (["--keep", "low", "--keep-fraction", "1", "-o", "x.txt"], 2, "the output must end in .jsonl"),
        (["--keep", "low", "--keep-fraction", "1", "-o", "-", "--json"], 2, "--json and -o - would both write to stdout"),
    ],
)
def test_bad_options_are_one_line(scored, args, code, message):
    done = CliRunner().invoke(cli, ["select", str(scored["run"]), *args])
    assert done.exit_code == code, done.output
    last = done.stderr.strip().splitlines()[-1]  # ours is one line; click's own adds its usage above it
    assert message in last and last.startswith(("ppl-eval: error:", "Error:")) and "Traceback" not in done.output


def test_an_output_that_exists_is_refused_without_overwrite(scored, tmp_path):
    out = tmp_path / "kept.jsonl"
    out.write_text("precious\n")
    args = ["select", str(scored["run"]), "--keep", "low", "--keep-fraction", "1", "-o", str(out)]
    refused = CliRunner().invoke(cli, args)
    assert refused.exit_code == 5 and "exists; use --overwrite" in refused.stderr and out.read_text() == "precious\n"
    assert CliRunner().invoke(cli, [*args, "--overwrite"]).exit_code == 0 and out.read_text() != "precious\n"


def test_data_from_another_source_is_refused_and_nothing_is_written(scored, tmp_path):
    rows = records()
    rows[7]["text"] = "a different text"
    (tmp_path / "alt").mkdir()
    other = tmp_path / "alt" / "corpus.jsonl.gz"  # the same name, so the same ids: only the content differs
    other.write_bytes(gzip.compress("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()))
    out = tmp_path / "kept.jsonl"
    with pytest.raises(PplError, match="is not the data .* scored \\(its fingerprint differs\\)"):
        select_records(SelectConfig(str(scored["run"]), str(out), keep="low", keep_fraction=1.0, data=(str(other),)))
    assert not out.exists() and not list(tmp_path.glob(".kept*"))  # no half-written output
    shifted = tmp_path / "corpus.jsonl.gz"
    shifted.write_bytes(gzip.compress(("\n" + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records())).encode()))
    with pytest.raises(PplError, match="document 0 has id 'corpus.jsonl.gz:2' here"):  # ids (file:line) moved
        select_records(SelectConfig(str(scored["run"]), str(out), keep="low", keep_fraction=1.0, data=(str(shifted),)))
