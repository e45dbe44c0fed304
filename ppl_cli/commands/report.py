"""`ppl-eval report`: one self-contained HTML page about a run, or several runs side by side.

Everything comes from the result directories: summary.json, documents.jsonl (read once, a few
numbers a document kept: a histogram, the most and least surprising documents, a bounded sample
for the scatter), contexts.jsonl through the summary, and tokens/*.parquet when the run saved
them (only the shown documents' tokens are read). Plots are matplotlib SVG inlined in the page;
`--png DIR` also writes them as PNG files. Nothing on the page comes from the network.
"""

from __future__ import annotations

import heapq
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import EXIT_OUTPUT, PplError
from ..output.run_directory import DOCUMENTS_FILE, read_rows, write_atomic
from ..output.token_export import TOKENS_DIR
from .compare import CompareConfig, Run, compare_runs, joined_rows, read_run

HISTOGRAM_EDGES = 10 ** (np.arange(0, 8 * 20 + 1) / 20)  # token perplexity 1 to 1e8, 20 bins a decade
SCATTER_POINTS = 5000
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


@dataclass(frozen=True)
class ReportConfig:
    runs: tuple[str, ...]
    output: str
    png: str | None = None  # a folder for the plots as PNG files
    documents: int = 5  # most and least surprising documents shown
    tokens: int = 2000  # tokens shown of each such document

    def __post_init__(self):
        if not self.runs:
            raise PplError("report needs at least one result directory")
        if self.documents < 0 or self.tokens < 1:
            raise PplError("--documents must be 0 or more and --tokens at least 1")


@dataclass
class RunScan:
    """What the page needs from one run's documents.jsonl, in bounded memory."""

    histogram: np.ndarray = field(default_factory=lambda: np.zeros(len(HISTOGRAM_EDGES) - 1, dtype=np.int64))
    highest: list = field(default_factory=list)  # min-heap of (perplexity, -index, row): the most surprising
    lowest: list = field(default_factory=list)  # min-heap of (-perplexity, -index, row): the least
    documents: int = 0


def build_report(config: ReportConfig) -> dict:
    """Write the page; returns what it shows (for tests and the CLI's message)."""
    runs = [read_run(Path(p)) for p in config.runs]
    scans = [scan(run, config.documents) for run in runs]
    plots = {
        "perplexity_histogram": histogram_figure(runs, scans),
        "context_curve": context_figure(runs),
    }
    comparison, refusal = None, None
    if len(runs) > 1:
        try:
            comparison = compare_runs(CompareConfig(tuple(config.runs)))
        except PplError as e:
            refusal = str(e)
        if comparison:
            plots["nll_scatter"] = scatter_figure(runs)
    shown = shown_documents(runs[0], scans[0], config.tokens)
    svgs = {name: figure_svg(fig) for name, fig in plots.items()}
    page = render(runs, scans, svgs, comparison, refusal, shown, config)
    output = Path(config.output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(output, page)
        if config.png:
            Path(config.png).mkdir(parents=True, exist_ok=True)
            for name, fig in plots.items():
                fig.savefig(Path(config.png) / f"{name}.png", dpi=150)
    except OSError as e:
        raise PplError(f"cannot write the report: {e.strerror} ({e.filename})", EXIT_OUTPUT) from None
    return {"output": str(output), "plots": list(svgs), "documents_shown": len(shown), "coloured": sum(1 for d in shown if d["tokens"])}


def scan(run: Run, keep: int) -> RunScan:
    out = RunScan()
    for row in read_rows(run.path / DOCUMENTS_FILE):
        out.documents += 1
        ppl = row["token_perplexity"]
        if ppl is None:
            continue
        out.histogram[min(max(np.searchsorted(HISTOGRAM_EDGES, ppl, side="right") - 1, 0), len(out.histogram) - 1)] += 1
        bounded_push(out.highest, (ppl, -row["index"], row), keep)
        bounded_push(out.lowest, (-ppl, -row["index"], row), keep)
    return out


def bounded_push(heap: list, item: tuple, size: int) -> None:
    if size <= 0:
        return
    if len(heap) < size:
        heapq.heappush(heap, item)
    elif item[:2] > heap[0][:2]:
        heapq.heapreplace(heap, item)


# --- plots --------------------------------------------------------------------------------------


def new_figure(width=6.4, height=3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    ax.grid(True, color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def figure_svg(fig) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # the element alone, to inline


def histogram_figure(runs: list[Run], scans: list[RunScan]):
    fig, ax = new_figure()
    used = [i for s in scans for i in np.nonzero(s.histogram)[0]]
    lo, hi = (min(used), max(used) + 1) if used else (0, len(HISTOGRAM_EDGES) - 1)
    for k, (run, s) in enumerate(zip(runs, scans)):
        ax.stairs(s.histogram[lo:hi], HISTOGRAM_EDGES[lo : hi + 1], label=short_name(run), color=COLOURS[k % len(COLOURS)], linewidth=1.6)
    ax.set_xscale("log")
    return labelled(fig, ax, runs, "token perplexity of a document (log scale)", "documents")


def context_figure(runs: list[Run]):
    fig, ax = new_figure()
    for k, run in enumerate(runs):
        curve = run.summary.get("context_curve") or {}
        points = [(lo, m) for (lo, _), m in zip(curve.get("context_tokens", []), curve.get("mean_nll", [])) if m is not None]
        if points:
            x, y = zip(*points)
            ax.plot(x, y, marker="o", markersize=4, label=short_name(run), color=COLOURS[k % len(COLOURS)])
    ax.set_xscale("log", base=2)
    return labelled(fig, ax, runs, "tokens of context the model had (buckets 1, 2-3, 4-7, ...)", "mean NLL (nats per token)")


def labelled(fig, ax, runs: list[Run], xlabel: str, ylabel: str):
    """Axis labels, and a legend when there is more than one run to tell apart."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(runs) > 1:
        ax.legend(frameon=False)
    return fig


def scatter_figure(runs: list[Run]):
    """Per-document NLL per token of each run against the baseline's, at most SCATTER_POINTS a run."""
    fig, ax = new_figure(5.0, 4.4)
    every = max(1, math.ceil(runs[0].summary["documents"] / SCATTER_POINTS))
    points: list[list[tuple[float, float]]] = [[] for _ in runs[1:]]
    for n, rows in enumerate(joined_rows(runs, by_id=False)):
        if n % every or not rows[0]["tokens"]:
            continue
        base = rows[0]["nll_sum"] / rows[0]["tokens"]
        for k, row in enumerate(rows[1:]):
            if row["tokens"]:
                points[k].append((base, row["nll_sum"] / row["tokens"]))
    everything = [v for p in points for xy in p for v in xy]
    for k, p in enumerate(points):
        if p:
            x, y = zip(*p)
            ax.scatter(x, y, s=9 if len(x) > 300 else 25, alpha=0.6, color=COLOURS[(k + 1) % len(COLOURS)], label=short_name(runs[k + 1]), linewidths=0)
    if everything:
        lo, hi = min(everything), max(everything)
        ax.plot([lo, hi], [lo, hi], color="#666", linewidth=1, linestyle="--", label="no change")
    ax.set_xlabel(f"NLL per token, {short_name(runs[0])} (baseline)")
    ax.set_ylabel("NLL per token, the other run")
    ax.legend(frameon=False)
    note = f"every {every}th document" if every > 1 else "every document"
    ax.set_title(note, fontsize=9, color="#666")
    return fig


def short_name(run: Run) -> str:
    return run.path.name or str(run.path)


# --- documents ----------------------------------------------------------------------------------


def shown_documents(run: Run, s: RunScan, limit: int) -> list[dict]:
    """The most and least surprising documents, each with its first `limit` tokens when saved."""
    chosen = [("most surprising", row) for _, _, row in sorted(s.highest, reverse=True)]
    chosen += [("least surprising", row) for _, _, row in sorted(s.lowest, reverse=True)]
    tokens = saved_tokens(run.path, {row["index"] for _, row in chosen}, limit)
    return [{"kind": kind, "row": row, "tokens": tokens.get(row["index"]), "limit": limit} for kind, row in chosen]


def saved_tokens(folder: Path, indices: set[int], limit: int) -> dict[int, dict]:
    """The saved tokens of these documents (the first `limit` of each), read from tokens/ by filter."""
    if not indices or not (folder / TOKENS_DIR).is_dir():
        return {}
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    table = ds.dataset(folder / TOKENS_DIR, format="parquet").to_table(filter=pc.field("index").isin(sorted(indices)))
    out: dict[int, dict] = {}
    for index in indices:
        part = table.filter(pc.equal(table["index"], index)).sort_by("position")
        if part.num_rows:
            columns = part.slice(0, limit).to_pydict()
            columns["total"] = part.num_rows
            out[index] = columns
    return out


SURPRISAL_STEPS = 12  # colour buckets: 0-1, 1-2, ..., 11+ nats


def token_spans(tokens: dict) -> str:
    """Each token as a span coloured by its surprisal, -ln p, with p, rank and entropy on hover."""
    out = []
    for piece, logprob, rank, entropy in zip(tokens["token"], tokens["logprob"], tokens["rank"], tokens["entropy"]):
        surprisal = -logprob
        tip = f"p = {math.exp(logprob):.4f}, -ln p = {surprisal:.2f} nats, rank {rank}, entropy {entropy:.2f} nats"
        out.append(f'<span class="tok s{surprisal_step(surprisal)}" title="{html.escape(tip)}">{html.escape(piece)}</span>')
    return "".join(out)


def surprisal_step(nats: float) -> int:
    return min(max(int(nats), 0), SURPRISAL_STEPS - 1)


def surprisal_styles() -> str:
    """One red, more opaque the more surprising: nearly clear under 1 nat, strong from 11 nats."""
    return "".join(f".s{k} {{ background: rgba(220, 50, 32, {0.03 + 0.72 * k / (SURPRISAL_STEPS - 1):.3f}); }}\n" for k in range(SURPRISAL_STEPS))


# --- the page -----------------------------------------------------------------------------------

STYLE = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #1d1d1f;
       margin: 0 auto; max-width: 1100px; padding: 24px 32px 64px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 20px; margin: 36px 0 10px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 16px; margin: 22px 0 6px; }
.sub { color: #666; margin: 0 0 18px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-variant-numeric: tabular-nums; }
th, td { padding: 4px 12px 4px 0; text-align: left; vertical-align: top; border-bottom: 1px solid #eee; }
th { font-weight: 600; color: #444; }
td.num { text-align: right; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(460px, 1fr)); gap: 12px 28px; }
figure { margin: 0; max-width: 620px; } figcaption { color: #555; font-size: 13px; margin-top: 2px; }
figure svg { width: 100%; height: auto; }
.doc { border: 1px solid #e3e3e3; border-radius: 6px; padding: 10px 14px; margin: 10px 0 18px; }
.doc .text { white-space: pre-wrap; font: 13px/1.7 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
             max-height: 420px; overflow-y: auto; margin-top: 8px; }
.tok { border-radius: 2px; } .tok:hover { outline: 1px solid #333; }
.legend span { display: inline-block; width: 26px; height: 12px; vertical-align: middle; }
.note { color: #666; font-size: 13px; } .warn { color: #a33; }
code { background: #f4f4f4; padding: 1px 4px; border-radius: 3px; font-size: 13px; }
"""

CHECK = """
<script>
// A self-check a headless browser can read back: plots drawn, coloured tokens shown, no script errors.
const plots = [...document.querySelectorAll("figure.plot svg")].filter(s => s.getBoundingClientRect().width > 100);
document.body.dataset.check = JSON.stringify({plots: plots.length, tokens: document.querySelectorAll("span.tok").length,
  errors: window.pageErrors || []});
</script>
"""


def render(runs, scans, svgs, comparison, refusal, shown, config) -> str:
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>ppl-eval report: {html.escape(', '.join(short_name(r) for r in runs))}</title>",
        f"<style>{STYLE}{surprisal_styles()}</style><script>window.pageErrors = []; window.onerror = (m) => window.pageErrors.push(String(m));</script>",
        "</head><body>",
        "<h1>ppl-eval report</h1>",
        f"<p class='sub'>{len(runs)} run{'s' * (len(runs) > 1)}: {html.escape(', '.join(str(r.path) for r in runs))}</p>",
        "<h2>Summary</h2>",
        summary_table(runs),
        "<h2>Where the perplexity comes from</h2><div class='grid'>",
        plot(svgs, "perplexity_histogram", "How many documents have each token perplexity (log scale)."),
        plot(svgs, "context_curve", "Mean NLL of the scored tokens by the context they had: how much the context helps."),
        "</div>",
    ]
    if len(runs) > 1:
        parts.append("<h2>Paired comparison</h2>")
        if comparison:
            parts.append(comparison_table(comparison))
            parts.append("<div class='grid'>" + plot(svgs, "nll_scatter", "NLL per token of each document: below the line, the other run predicts it better.") + "</div>")
        else:
            parts.append(f"<p class='warn'>Not compared: {html.escape(refusal or '')}</p>")
    parts.append(documents_section(runs[0], shown, config))
    parts.append(provenance(runs))
    parts.append(CHECK + "</body></html>")
    return "\n".join(parts)


def plot(svgs: dict, name: str, caption: str) -> str:
    return f"<figure class='plot' id='{name}'>{svgs[name]}<figcaption>{html.escape(caption)}</figcaption></figure>"


def fmt(value, digits=4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    return f"{value:,.{digits}f}" if abs(value) < 1e4 else f"{value:,.1f}"


def interval(summary: dict, key: str) -> str:
    ci = (summary.get("bootstrap") or {}).get(key)
    return f"{fmt(ci[0])} – {fmt(ci[1])}" if ci else ""


def summary_table(runs: list[Run]) -> str:
    header = "".join(f"<th>{html.escape(short_name(r))}</th>" for r in runs)
    lines = [
        ("model", lambda s: f"{s['model']['id']} ({s['model']['dtype']}, {s['model']['device']})"),
        ("token perplexity", lambda s: fmt(s["token_perplexity"])),
        ("95% interval", lambda s: interval(s, "token_perplexity")),
        ("bits per byte", lambda s: fmt(s["bits_per_byte"])),
        ("95% interval ", lambda s: interval(s, "bits_per_byte")),
        ("word perplexity", lambda s: fmt(s["word_perplexity"])),
        ("byte perplexity", lambda s: fmt(s["byte_perplexity"])),
        ("macro token perplexity", lambda s: fmt(s["macro_token_perplexity"])),
        ("documents (skipped)", lambda s: f"{s['documents']:,} ({s['skipped_documents']:,})"),
        ("tokens scored", lambda s: f"{s['tokens']:,}"),
        ("scored tokens/s", lambda s: fmt(s.get("tokens_per_second"), 0)),
    ]
    if any("reference" in r.summary for r in runs):
        lines += [
            ("reference model", lambda s: s.get("reference", {}).get("model", {}).get("id", "")),
            ("mean KL(P || Q)", lambda s: ref(s, "kld_mean")),
            ("same top token", lambda s: ref(s, "same_top_p")),
            ("PPL(Q) / PPL(ref)", lambda s: ref(s, "ppl_ratio")),
        ]
    body = "".join(
        f"<tr><th>{html.escape(name.strip())}</th>" + "".join(f"<td>{html.escape(str(get(r.summary)))}</td>" for r in runs) + "</tr>"
        for name, get in lines
    )
    return f"<table><tr><th></th>{header}</tr>{body}</table>"


def ref(summary: dict, key: str) -> str:
    stat = summary.get("reference", {}).get(key)
    return f"{fmt(stat['value'])} ± {fmt(stat['uncertainty'])}" if stat else ""


def comparison_table(comparison: dict) -> str:
    rows = []
    for entry in comparison["runs"]:
        for metric in ("token_perplexity", "bits_per_byte", "word_perplexity", "byte_perplexity"):
            m = entry[metric]
            ci = f"{m['ci'][0]:+.4f} – {m['ci'][1]:+.4f}" if m["ci"] else "n/a"
            p = f"{m['p_value']:.4f}" if m["p_value"] is not None else "n/a"
            rows.append(
                f"<tr><td>{html.escape(Path(entry['run']).name)}</td><td>{metric.replace('_', ' ')}</td><td class='num'>{fmt(m['a'])}</td>"
                f"<td class='num'>{fmt(m['b'])}</td><td class='num'>{m['delta']:+.4f}</td><td>{ci}</td><td class='num'>{p}</td></tr>"
            )
        docs = entry["documents"]
        rows.append(f"<tr><td colspan='7' class='note'>better on {docs['better']:,} of {docs['compared']:,} documents ({docs['better_share']:.0%}), worse on {docs['worse']:,}</td></tr>")
    head = "<tr><th>run</th><th>metric</th><th>baseline</th><th>run</th><th>difference</th><th>95% paired interval</th><th>p</th></tr>"
    note = f"<p class='note'>Paired Poisson bootstrap, {comparison['bootstrap']['samples']:,} resamples, seed {comparison['bootstrap']['seed']} (as <code>ppl-eval compare</code>).</p>"
    return f"<table>{head}{''.join(rows)}</table>{note}"


def documents_section(run: Run, shown: list[dict], config) -> str:
    if not shown:
        return ""
    parts = [f"<h2>The most and least surprising documents of {html.escape(short_name(run))}</h2>"]
    parts.append(
        f"<p class='note'>The {config.documents} documents with the highest and the {config.documents} with the lowest token perplexity, "
        f"of {run.summary['documents']:,}; at most the first {config.tokens:,} tokens of each.</p>"
    )
    if any(d["tokens"] for d in shown):
        stops = "".join(f"<span class='s{k}'></span>" for k in range(SURPRISAL_STEPS))
        parts.append(f"<p class='legend note'>surprisal, -ln p: 0 {stops} {SURPRISAL_STEPS - 1}+ nats; hover a token for its probability, rank and entropy</p>")
    else:
        parts.append("<p class='note'>Token text is shown for runs made with <code>--save-tokens</code>.</p>")
    for d in shown:
        row = d["row"]
        head = (
            f"<h3>{d['kind']}: {html.escape(str(row['id']))} <span class='note'>(document {row['index']:,}: "
            f"token perplexity {fmt(row['token_perplexity'])}, {row['tokens']:,} tokens)</span></h3>"
        )
        text = ""
        if d["tokens"]:
            more = d["tokens"]["total"] - len(d["tokens"]["token"])
            tail = f"<p class='note'>{more:,} more tokens not shown.</p>" if more > 0 else ""
            text = f"<div class='text'>{token_spans(d['tokens'])}</div>{tail}"
        parts.append(f"<div class='doc'>{head}{text}</div>")
    return "\n".join(parts)


def provenance(runs: list[Run]) -> str:
    rows = []
    for run in runs:
        s = run.summary
        windowing = ", ".join(f"{k} {v}" for k, v in s["windowing"].items())
        versions = ", ".join(f"{k} {v}" for k, v in s.get("versions", {}).items() if v)
        data = s["data"]
        rows.append(
            f"<tr><td>{html.escape(short_name(run))}</td><td>{html.escape(str(s['model'].get('id')))}, {s['model'].get('parameters', 0):,} parameters,"
            f" {html.escape(str(s['model'].get('architecture')))}</td><td>{html.escape(str(data.get('source')))}, {data.get('documents', 0):,} documents,"
            f" <code>{html.escape(str(data.get('fingerprint', ''))[:27])}…</code></td><td>{html.escape(windowing)}</td><td>{html.escape(versions)}</td></tr>"
        )
    head = "<tr><th>run</th><th>model</th><th>data</th><th>windowing</th><th>versions</th></tr>"
    return f"<h2>Provenance</h2><table>{head}{''.join(rows)}</table><p class='note'>Made by ppl-eval report from summary.json and documents.jsonl.</p>"
