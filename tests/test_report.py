"""`ppl-eval report`: the page's numbers, its bounds, and a real headless browser rendering it."""

import json
import math
import re
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from ppl_cli.cli import cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def two_runs(tiny_llama, tmp_path_factory):
    """Two runs of the same corpus (window 32 and, as a second 'model', the same model in bfloat16)."""
    from conftest import PROSE

    folder = tmp_path_factory.mktemp("report-runs")
    data = folder / "corpus.jsonl"
    data.write_text("".join(json.dumps({"id": f"doc{i}", "text": " ".join(PROSE[(i + k) % 8] for k in range(i % 4 + 1))}) + "\n" for i in range(12)))
    runs = []
    for name, extra in (("base", []), ("bf16", ["--dtype", "bfloat16"])):
        out = folder / name
        args = ["run", "-q", "--model", tiny_llama, "--data", str(data), "--window", "32", "--id-field", "id", "--save-tokens", "-o", str(out), *extra]
        done = CliRunner().invoke(cli, args)
        assert done.exit_code == 0, done.output
        runs.append(str(out))
    return runs


def make(runs, page, *extra):
    done = CliRunner().invoke(cli, ["report", *runs, "-o", str(page), *extra])
    assert done.exit_code == 0, done.output
    return page.read_text(), done.stdout


def test_one_self_contained_page_with_every_plot(two_runs, tmp_path):
    text, said = make(two_runs, tmp_path / "report.html", "--png", str(tmp_path / "png"))
    assert said.startswith(f"{tmp_path / 'report.html'}: 3 plots, 10 documents, 10 with their tokens coloured")
    for plot in ("perplexity_histogram", "context_curve", "nll_scatter"):
        assert f"<figure class='plot' id='{plot}'><svg" in text
        assert (tmp_path / "png" / f"{plot}.png").stat().st_size > 5000
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing is fetched: images and styles are inline
    assert "<link" not in text and "@import" not in text


def test_the_numbers_are_the_runs_and_the_comparisons(two_runs, tmp_path):
    text, _ = make(two_runs, tmp_path / "report.html")
    summary = json.loads(open(f"{two_runs[0]}/summary.json").read())
    shown = lambda v: f"{v:,.4f}" if abs(v) < 1e4 else f"{v:,.1f}"  # noqa: E731 (the page's rule: 4 decimals, 1 from 10,000)
    assert shown(summary["token_perplexity"]) in text and shown(summary["bits_per_byte"]) in text
    low, high = summary["bootstrap"]["token_perplexity"]
    assert f"{shown(low)} – {shown(high)}" in text
    comparison = json.loads(CliRunner().invoke(cli, ["compare", *two_runs, "--json"]).stdout)
    delta = comparison["token_perplexity"]
    assert f"{delta['delta']:+.4f}" in text and f"{delta['p_value']:.4f}" in text
    assert summary["model"]["id"] in text and summary["data"]["fingerprint"][:27] in text  # provenance


def test_the_page_is_bounded(two_runs, tmp_path):
    text, said = make(two_runs[:1], tmp_path / "small.html", "--documents", "2", "--tokens", "7")
    assert "2 plots, 4 documents" in said
    assert text.count("<div class='doc'>") == 4
    spans = re.findall(r"<div class='text'>(.*?)</div>", text, re.S)
    assert [s.count('<span class="tok') for s in spans] == [7, 7, 7, 7]
    assert "more tokens not shown" in text


def test_tokens_coloured_by_surprisal_with_details_on_hover(two_runs, tmp_path):
    import pyarrow.parquet as pq

    text, _ = make(two_runs[:1], tmp_path / "one.html", "--documents", "1")
    index = int(re.search(r"\(document ([\d,]+): token perplexity", text)[1].replace(",", ""))  # the most surprising
    spans = re.findall(r'<span class="tok s(\d+)" title="p = ([0-9.]+), -ln p = ([0-9.]+) nats, rank (\d+), entropy ([0-9.]+) nats">', text)
    table = pq.read_table(f"{two_runs[0]}/tokens").sort_by([("index", "ascending"), ("position", "ascending")]).to_pydict()
    rows = [k for k, i in enumerate(table["index"]) if i == index]
    for (step, p, surprisal, rank, entropy), k in zip(spans, rows):
        assert float(surprisal) == pytest.approx(-table["logprob"][k], abs=0.006)
        assert float(p) == pytest.approx(math.exp(table["logprob"][k]), abs=6e-5)
        assert int(rank) == table["rank"][k] and float(entropy) == pytest.approx(table["entropy"][k], abs=0.006)
        assert int(step) == min(int(-table["logprob"][k]), 11)
    assert len(spans) >= len(rows) > 0


def test_runs_without_saved_tokens_say_how_to_get_them(tiny_gpt2, corpus_jsonl, tmp_path):
    out = tmp_path / "plain"
    assert CliRunner().invoke(cli, ["run", "-q", "--model", tiny_gpt2, "--data", corpus_jsonl, "--window", "32", "-o", str(out)]).exit_code == 0
    text, said = make([str(out)], tmp_path / "page.html")
    assert "Token text is shown for runs made with <code>--save-tokens</code>" in text and "coloured" not in said


def test_runs_that_cannot_be_compared_are_shown_with_the_reason(two_runs, tiny_gpt2, corpus_jsonl, tmp_path):
    other = tmp_path / "other"
    assert CliRunner().invoke(cli, ["run", "-q", "--model", tiny_gpt2, "--data", corpus_jsonl, "--window", "32", "-o", str(other)]).exit_code == 0
    text, said = make([two_runs[0], str(other)], tmp_path / "page.html")
    assert "Not compared:" in text and "scored different data" in text and "2 plots" in said


def test_bad_input_is_one_line(tmp_path):
    done = CliRunner().invoke(cli, ["report", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.html")])
    assert done.exit_code == 3 and "is not a finished ppl-eval run" in done.stderr and len(done.stderr.splitlines()) == 1


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (apt-get install -y chromium); .ci/run installs it")
def test_the_page_in_a_real_browser(two_runs, tmp_path):
    page = tmp_path / "report.html"
    make(two_runs, page)
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    check = json.loads(re.search(r'data-check="([^"]*)"', dom.stdout)[1].replace("&quot;", '"'))
    assert check == {"plots": 3, "tokens": check["tokens"], "words": 0, "errors": []} and check["tokens"] > 100
    shot = tmp_path / "report.png"
    done = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri()], capture_output=True, timeout=120)
    assert done.returncode == 0 and shot.stat().st_size > 50_000  # a rendered page, not a blank one
