"""`ppl-eval report`: one self-contained HTML page about a run, or several runs side by side.

Everything comes from the result directories: summary.json, documents.jsonl (read once, a few
numbers a document kept: a histogram, the most and least surprising documents, a bounded sample
for the scatter), contexts.jsonl through the summary, and tokens/*.parquet when the run saved
them (only the shown documents' tokens are read). Plots are matplotlib SVG inlined in the page;
`--png DIR` also writes them as PNG files. Nothing on the page comes from the network.
"""

from __future__ import annotations

import heapq
import io
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import EXIT_OUTPUT, PplError
from ..output.run_directory import DOCUMENTS_FILE, SERIES_FILE, read_rows, write_atomic
from ..output.signals import HIGHER_MEANS_SEEN, SIGNALS
from ..output.token_export import TOKENS_DIR
from ..output.word_export import WORDS_DIR
from .compare import CompareConfig, Run, compare_runs, joined_rows, read_run

HISTOGRAM_EDGES = 10 ** (np.arange(0, 8 * 20 + 1) / 20)  # token perplexity 1 to 1e8, 20 bins a decade
SIGNAL_BINS = 40  # a signal's histogram: equal bins from the lowest to the highest value of any run shown
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
    signals: dict[str, np.ndarray] = field(default_factory=dict)  # --signals: a histogram over signal_edges' bins


def build_report(config: ReportConfig) -> dict:
    """Write the page; returns what it shows (for tests and the CLI's message). A series directory
    alone gets its curve (each metric against step) and its checkpoints' paired changes, then the
    page of its last checkpoint."""
    series = None
    if len(config.runs) == 1 and (Path(config.runs[0]) / SERIES_FILE).is_file():
        series = compare_runs(CompareConfig(config.runs))
        config = replace(config, runs=(str(Path(config.runs[0]) / Path(series["checkpoints"][-1]["name"])),))
    runs = [read_run(Path(p)) for p in config.runs]
    edges = signal_edges(runs)
    scans = [scan(run, config.documents, edges) for run in runs]
    plots = {
        "perplexity_histogram": histogram_figure(runs, scans),
        "context_curve": context_figure(runs),
    }
    if any("length_curve" in run.summary for run in runs):
        plots["length_curve"] = length_figure(runs)
    for name in edges:
        plots[f"signal_{name}"] = signal_figure(runs, scans, name, edges[name])
    comparison, refusal = None, None
    if len(runs) > 1:
        try:
            comparison = compare_runs(CompareConfig(tuple(config.runs)))
        except PplError as e:
            refusal = str(e)
        if comparison:
            plots["nll_scatter"] = scatter_figure(runs)
    if series is not None:
        plots["series_curve"] = series_figure(series)
    if "groups" in runs[0].summary:
        plots["group_perplexity"] = group_figure(runs)
        if comparison and "groups" in comparison["runs"][0]:
            plots["group_deltas"] = forest_figure(comparison)
    shown = shown_documents(runs[0], scans[0], config.tokens)
    svgs = {name: figure_svg(fig) for name, fig in plots.items()}
    page = render(runs, scans, svgs, comparison, refusal, shown, config, series)
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
    return {
        "output": str(output), "plots": list(svgs), "documents_shown": len(shown),
        "coloured": sum(1 for d in shown if d["tokens"]), "words_coloured": sum(1 for d in shown if d["words"]),
    }  # fmt: skip


def signal_edges(runs: list[Run]) -> dict[str, np.ndarray]:
    """Each --signals value some run has: SIGNAL_BINS equal bins over every run's range (their summaries' min and max)."""
    edges = {}
    for name in SIGNALS:
        ranges = [(run.summary.get("signals") or {}).get(name) for run in runs]
        ranges = [r for r in ranges if r]
        if ranges:
            low, high = min(r["min"] for r in ranges), max(r["max"] for r in ranges)
            edges[name] = np.linspace(low, high if high > low else low + 1, SIGNAL_BINS + 1)
    return edges


def scan(run: Run, keep: int, edges: dict[str, np.ndarray]) -> RunScan:
    out = RunScan(signals={name: np.zeros(SIGNAL_BINS, dtype=np.int64) for name in edges})
    for row in read_rows(run.path / DOCUMENTS_FILE):
        out.documents += 1
        for name, counts in out.signals.items():
            if row.get(name) is not None:
                counts[bin_index(edges[name], row[name])] += 1
        ppl = row["token_perplexity"]
        if ppl is None:
            continue
        out.histogram[bin_index(HISTOGRAM_EDGES, ppl)] += 1
        bounded_push(out.highest, (ppl, -row["index"], row), keep)
        bounded_push(out.lowest, (-ppl, -row["index"], row), keep)
    return out


def bin_index(edges: np.ndarray, value: float) -> int:
    """The histogram bin of `value` between `edges`; values beyond either end count in the end bins."""
    return min(max(int(np.searchsorted(edges, value, side="right")) - 1, 0), len(edges) - 2)


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
    plain_ticks(ax.xaxis, between_powers=True)
    whole_counts(ax.yaxis)
    return labelled(fig, ax, runs, "token perplexity of a document (log scale)", "documents")


def plain_ticks(axis, between_powers: bool = False) -> None:
    """A log axis's ticks as plain numbers (14, 256, 1,024), not powers (1.4x10^1, 2^8); with
    `between_powers` (base 10), ticks at 1, 1.5, 2, 3, 5 and 7 of each decade, so that a range
    inside one decade (perplexities of 14 to 22) still has labelled ticks."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    if between_powers:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    label = FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 10 else f"{value:g}")
    axis.set_major_formatter(label)
    axis.set_minor_formatter(FuncFormatter(lambda value, _: ""))


def whole_counts(axis) -> None:
    """An axis of document counts ticks at whole documents only."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


SIGNAL_AXES = {
    "min_k": "Min-K% Prob: mean log p of the least likely tokens",
    "min_k_plus_plus": "Min-K%++: mean z of the least likely tokens",
    "zlib_ratio": "zlib ratio: ln perplexity / zlib bytes",
    "mean_entropy": "mean predictive entropy (nats)",
    "reference_ratio": "reference ratio: ln perplexity / the reference's",
}


def signal_figure(runs: list[Run], scans: list[RunScan], name: str, edges: np.ndarray):
    """How many documents have each value of one signal, every run over the same bins."""
    fig, ax = new_figure(5.0, 3.2)
    for k, (run, s) in enumerate(zip(runs, scans)):
        if s.signals[name].any():
            ax.stairs(s.signals[name], edges, label=short_name(run), color=COLOURS[k % len(COLOURS)], linewidth=1.6)
    whole_counts(ax.yaxis)
    seen = "higher" if HIGHER_MEANS_SEEN[name] else "lower"
    ax.set_title(f"{seen}: more likely seen in training" if name != "mean_entropy" else "lower: the model is more certain", fontsize=9, color="#666")
    return labelled(fig, ax, runs, SIGNAL_AXES[name], "documents")


def context_figure(runs: list[Run]):
    fig, ax = new_figure()
    for k, run in enumerate(runs):
        curve = run.summary.get("context_curve") or {}
        points = [(lo, m) for (lo, _), m in zip(curve.get("context_tokens", []), curve.get("mean_nll", [])) if m is not None]
        if points:
            x, y = zip(*points)
            ax.plot(x, y, marker="o", markersize=4, label=short_name(run), color=COLOURS[k % len(COLOURS)])
    ax.set_xscale("log", base=2)
    plain_ticks(ax.xaxis)
    return labelled(fig, ax, runs, "tokens of context the model had (buckets 1, 2-3, 4-7, ...)", "mean NLL (nats per token)")


def length_figure(runs: list[Run]):
    """Token perplexity against context length (--lengths), a line a run, its 95% interval a band."""
    fig, ax = new_figure()
    for k, run in enumerate(runs):
        points = [p for p in (run.summary.get("length_curve") or {}).get("points", []) if p["token_perplexity"] is not None]
        if not points:
            continue
        colour = COLOURS[k % len(COLOURS)]
        x = [p["length"] for p in points]
        ax.plot(x, [p["token_perplexity"] for p in points], marker="o", markersize=4, label=short_name(run), color=colour)
        bands = [(p["length"], *p["bootstrap"]["token_perplexity"]) for p in points if (p.get("bootstrap") or {}).get("token_perplexity")]
        if bands:
            bx, low, high = zip(*bands)
            ax.fill_between(bx, low, high, color=colour, alpha=0.18, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # a curve from 30 to 17 falls as far as one from 100 to 57: the same share
    plain_ticks(ax.xaxis)
    plain_ticks(ax.yaxis, between_powers=True)
    lengths = sorted({p["length"] for run in runs for p in (run.summary.get("length_curve") or {}).get("points", [])})
    if lengths and len(lengths) <= 12:
        ax.set_xticks(lengths)
    return labelled(fig, ax, runs, "context length (tokens, log scale)", "token perplexity (log scale, 95% interval)")


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


def series_figure(series: dict):
    """Token perplexity against step (or checkpoint order), with each checkpoint's 95% interval."""
    fig, ax = new_figure()
    checkpoints = series["checkpoints"]
    by_step = all(c["step"] is not None for c in checkpoints)
    xs = [c["step"] if by_step else k for k, c in enumerate(checkpoints)]
    ys = [c["token_perplexity"]["value"] for c in checkpoints]
    low = [y - (c["token_perplexity"]["ci"] or [y, y])[0] for y, c in zip(ys, checkpoints)]
    high = [(c["token_perplexity"]["ci"] or [y, y])[1] - y for y, c in zip(ys, checkpoints)]
    ax.errorbar(xs, ys, yerr=[low, high], fmt="o-", markersize=4, capsize=3, color=COLOURS[0])
    if not by_step:
        ax.set_xticks(xs, [c["name"][:16] for c in checkpoints], rotation=30, fontsize=8)
    ax.set_xlabel("step" if by_step else "checkpoint")
    ax.set_ylabel("token perplexity (95% interval)")
    return fig


GROUPS_PLOTTED = 50  # a per-group plot shows at most this many groups: the highest perplexity first


def plotted_groups(names: list[str]) -> list[str]:
    return names[:GROUPS_PLOTTED]


def group_figure(runs: list[Run]):
    """Each group's token perplexity with its 95% interval, sorted by the first run's, for every run."""
    base = runs[0].summary["groups"]
    ranked = [name for name, g in sorted(base.items(), key=lambda kv: -(kv[1]["token_perplexity"] or 0)) if g["token_perplexity"] is not None]
    names = plotted_groups(ranked)
    fig, ax = new_figure(6.4, 1.2 + 0.28 * max(len(names), 1))
    offsets = np.linspace(-0.25, 0.25, len(runs)) if len(runs) > 1 else [0.0]
    for k, (run, offset) in enumerate(zip(runs, offsets)):
        groups = run.summary.get("groups", {})
        ys, xs, errors = [], [], [[], []]
        for y, name in enumerate(names):
            g = groups.get(name)
            if not g or g["token_perplexity"] is None:
                continue
            ci = (g.get("bootstrap") or {}).get("token_perplexity") or [g["token_perplexity"]] * 2
            ys.append(y + offset)
            xs.append(g["token_perplexity"])
            errors[0].append(g["token_perplexity"] - ci[0])
            errors[1].append(ci[1] - g["token_perplexity"])
        ax.errorbar(xs, ys, xerr=errors, fmt="o", markersize=4, capsize=2, color=COLOURS[k % len(COLOURS)], label=short_name(run))
    ax.set_yticks(range(len(names)), [name[:40] for name in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    shown = f"the {len(names)} of {len(ranked)} groups with the highest perplexity" if len(names) < len(ranked) else f"{len(names)} groups"
    ax.set_title(shown, fontsize=9, color="#666")
    return labelled(fig, ax, runs, "token perplexity, with its 95% interval (log scale)", "")


def forest_figure(comparison: dict):
    """Per group, each run's change in token perplexity against the baseline, in %, with its 95%
    paired interval; the groups whose Holm-adjusted p is below 0.05 in red."""
    entries = comparison["runs"]
    first = {g["group"]: g for g in entries[0]["groups"]}
    ranked = sorted(first, key=lambda name: -abs(relative(first[name]["token_perplexity"])[0]))
    names = plotted_groups(ranked)
    fig, ax = new_figure(6.4, 1.2 + 0.28 * max(len(names), 1))
    offsets = np.linspace(-0.25, 0.25, len(entries)) if len(entries) > 1 else [0.0]
    for entry, offset in zip(entries, offsets):
        groups = {g["group"]: g for g in entry["groups"]}
        for y, name in enumerate(names):
            m = groups[name]["token_perplexity"]
            value, low, high = relative(m)
            if not math.isfinite(value):
                continue
            significant = m["p_holm"] is not None and m["p_holm"] < entry["groups_significant"]["alpha"]
            colour = "#d62728" if significant else "#555"
            ax.errorbar([value], [y + offset], xerr=[[value - low], [high - value]], fmt="o", markersize=4, capsize=2, color=colour)
    ax.axvline(0, color="#999", linewidth=1, linestyle="--")
    ax.set_yticks(range(len(names)), [name[:40] for name in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("change in token perplexity against the baseline, % (95% paired interval)")
    shown = f"the {len(names)} of {len(ranked)} groups that changed most" if len(names) < len(ranked) else f"{len(names)} groups"
    ax.set_title(f"{shown}; red: Holm-adjusted p < 0.05", fontsize=9, color="#666")
    return fig


def relative(m: dict) -> tuple[float, float, float]:
    """A paired difference and its interval as a percentage of the baseline's value."""
    if not m["a"] or m["ci"] is None:
        return (100 * m["delta"] / m["a"] if m["a"] else math.nan,) * 3
    return 100 * m["delta"] / m["a"], 100 * m["ci"][0] / m["a"], 100 * m["ci"][1] / m["a"]


def windowing_text(windowing: dict) -> str:
    """A run's windowing for the provenance table: a --lengths run's lengths and protocol, not the
    window, stride and step its protocol does not use (its sliding protocol's stride aside)."""
    if windowing.get("lengths"):
        keys = ["convention", "lengths", "protocol", "passes", "min_tokens", *(["stride"] if windowing.get("protocol") == "sliding" else []), "add_bos"]
    else:
        keys = ["convention", "window", "stride", "step", "add_bos", "prefix_token_id", "detokenize"]
    shown = [f"{k} {windowing[k]}" for k in keys if k in windowing]
    if windowing.get("bos_token"):
        shown.append(f"start token {windowing['bos_token']['text']!r} ({windowing['bos_token']['id']})")
    return ", ".join(shown)


def short_name(run: Run) -> str:
    return run.path.name or str(run.path)


# --- documents ----------------------------------------------------------------------------------


def shown_documents(run: Run, s: RunScan, limit: int) -> list[dict]:
    """The most and least surprising documents, each once (a run of fewer than twice as many as are
    shown splits them: the more surprising half, then the rest), each with its first `limit` tokens
    and words when saved."""
    most = [row for _, _, row in sorted(s.highest, reverse=True)]
    least = [row for _, _, row in sorted(s.lowest, reverse=True)]
    if len(most) + len(least) > s.documents:  # the two lists overlap
        most = most[: (s.documents + 1) // 2]
        taken = {row["index"] for row in most}
        least = [row for row in least if row["index"] not in taken]
    chosen = [("most surprising", row) for row in most] + [("least surprising", row) for row in least]
    indices = {row["index"] for _, row in chosen}
    tokens = saved_parts(run.path, TOKENS_DIR, "position", indices, limit)
    words = saved_parts(run.path, WORDS_DIR, "word_index", indices, limit)
    return [{"kind": kind, "row": row, "tokens": tokens.get(row["index"]), "words": words.get(row["index"]), "limit": limit} for kind, row in chosen]


def saved_parts(folder: Path, subdir: str, order: str, indices: set[int], limit: int) -> dict[int, dict]:
    """These documents' saved tokens or words (the first `limit` of each, in `order`), read from folder/subdir by filter."""
    if not indices or not (folder / subdir).is_dir():
        return {}
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    table = ds.dataset(folder / subdir, format="parquet").to_table(filter=pc.field("index").isin(sorted(indices)))
    out: dict[int, dict] = {}
    for index in indices:
        part = table.filter(pc.equal(table["index"], index)).sort_by(order)
        if part.num_rows:
            columns = part.slice(0, limit).to_pydict()
            columns["total"] = part.num_rows
            out[index] = columns
    return out


SURPRISAL_STEPS = 12  # colour buckets: 0-1, 1-2, ..., 11+ nats
TEMPLATE = "report.html"  # in templates/, beside this module


def token_spans(tokens: dict) -> list[dict]:
    """Each token's text, surprisal step (its colour) and tip: p, -ln p, rank and entropy on hover.
    A context token (a document scored given a context) has no values: it is shown greyed."""
    out = []
    entropies = tokens.get("entropy") or [None] * len(tokens["token"])  # none from an engine that returns no distribution
    for piece, logprob, rank, entropy in zip(tokens["token"], tokens["logprob"], tokens["rank"], entropies):
        if logprob is None:
            out.append({"piece": piece, "context": True})
            continue
        surprisal = -logprob
        tip = f"p = {math.exp(logprob):.4f}, -ln p = {surprisal:.2f} nats, rank {rank}" + (f", entropy {entropy:.2f} nats" if entropy is not None else "")
        out.append({"piece": piece, "step": surprisal_step(surprisal), "tip": tip, "context": False})
    return out


def word_spans(words: dict) -> list[dict]:
    """Each saved word, its surprisal step (its colour), tip (its surprisal in bits and nats, tokens,
    the uncorrected sum) and the line breaks before it (from `space_before`, where the run saved it)."""
    out = []
    spaces = words.get("space_before") or [" "] * len(words["word"])
    for word, surprisal, tokens, plain, space in zip(words["word"], words["surprisal"], words["tokens"], words["uncorrected_surprisal"], spaces):
        breaks = min(space.count("\n"), 2)
        if surprisal is None:
            out.append({"word": word, "step": 0, "tip": f"no surprisal ({tokens} tokens of its own)", "breaks": breaks})
            continue
        tip = f"{surprisal / math.log(2):.2f} bits ({surprisal:.2f} nats), {tokens} token{'s' * (tokens != 1)}, uncorrected {plain:.2f} nats"
        out.append({"word": word, "step": surprisal_step(surprisal), "tip": tip, "breaks": breaks})
    return out


def surprisal_step(nats: float) -> int:
    return min(max(int(nats), 0), SURPRISAL_STEPS - 1)


# --- the page -----------------------------------------------------------------------------------


def render(runs, scans, svgs, comparison, refusal, shown, config, series=None) -> str:
    """The page from templates/report.html; numbers are formatted here, markup is the template's."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("ppl_cli.commands", "templates"), autoescape=True, keep_trailing_newline=True)
    env.filters["windowing_text"] = windowing_text
    env.filters.update(number=fmt, basename=lambda path: Path(path).name)
    documents = [
        {
            **d,
            **({"spans": token_spans(d["tokens"]), "more": d["tokens"]["total"] - len(d["tokens"]["token"])} if d["tokens"] else {}),
            **({"word_spans": word_spans(d["words"]), "more_words": d["words"]["total"] - len(d["words"]["word"])} if d["words"] else {}),
        }
        for d in shown
    ]
    return env.get_template(TEMPLATE).render(
        runs=[{"name": short_name(r), "path": str(r.path), "summary": r.summary} for r in runs],
        summary_rows=summary_rows(runs),
        svgs=svgs,
        comparison=comparison,
        refusal=refusal or "",
        metrics=("token_perplexity", "bits_per_byte", "word_perplexity", "byte_perplexity"),
        shown=documents,
        config=config,
        steps=SURPRISAL_STEPS,
        groups=group_rows(runs[0].summary),
        series=series_rows(series),
        signals=[(name, f"signal_{name}") for name in SIGNALS if f"signal_{name}" in svgs],
    )


def series_rows(series: dict | None) -> dict | None:
    """A series' checkpoints for the page's table, formatted."""
    if series is None:
        return None
    rows = []
    for c in series["checkpoints"]:
        m = c["token_perplexity"]
        d = c.get("against_previous", {}).get("token_perplexity")
        rows.append({
            "name": c["name"],
            "step": f"{c['step']:,}" if c["step"] is not None else "",
            "token_perplexity": fmt(m["value"]),
            "interval": f"{fmt(m['ci'][0])} – {fmt(m['ci'][1])}" if m["ci"] else "",
            "bits_per_byte": fmt(c["bits_per_byte"]["value"]),
            "delta": f"{d['delta']:+.4f}" if d else "",
            "delta_interval": f"{d['ci'][0]:+.4f} – {d['ci'][1]:+.4f}" if d and d["ci"] else "",
            "p": f"{d['p_value']:.4f}" if d and d["p_value"] is not None else "",
        })  # fmt: skip
    return {"path": series["series"], "rows": rows}


GROUP_ROWS = 500  # the page's table of groups stops here; summary.json has them all


def group_rows(summary: dict) -> dict | None:
    """The first run's groups for the page's table, the highest token perplexity first, formatted."""
    if "groups" not in summary:
        return None
    ranked = sorted(summary["groups"].items(), key=lambda kv: -(kv[1]["token_perplexity"] or -1))
    macro = summary["macro"]
    rows = [
        {
            "name": name,
            "documents": f"{g['documents']:,}" + (f" ({g['skipped_documents']:,})" if g["skipped_documents"] else ""),
            "tokens": f"{g['tokens']:,}",
            "token_perplexity": fmt(g["token_perplexity"]),
            "token_interval": interval(g, "token_perplexity"),
            "bits_per_byte": fmt(g["bits_per_byte"]),
            "bits_interval": interval(g, "bits_per_byte"),
        }
        for name, g in ranked[:GROUP_ROWS]
    ]
    return {
        "key": summary["group_by"]["key"],
        "rows": rows,
        "more": max(0, len(ranked) - GROUP_ROWS),
        "macro_perplexity": fmt(macro["token_perplexity"]),
        "macro_interval": interval(macro, "token_perplexity"),
        "macro_bits": fmt(macro["bits_per_byte"]),
        "macro_bits_interval": interval(macro, "bits_per_byte"),
    }


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


def summary_rows(runs: list[Run]) -> list[tuple[str, list[str]]]:
    """The summary table: a label and each run's value, formatted."""
    lines = [
        ("model", lambda s: f"{s['model']['id']} ({s['model']['dtype']}, {s['model']['device']})"),
        ("token perplexity", lambda s: fmt(s["token_perplexity"])),
        ("95% interval", lambda s: interval(s, "token_perplexity")),
        ("bits per byte", lambda s: fmt(s["bits_per_byte"])),
        ("95% interval", lambda s: interval(s, "bits_per_byte")),
        ("word perplexity", lambda s: fmt(s["word_perplexity"])),
        ("byte perplexity", lambda s: fmt(s["byte_perplexity"])),
        ("macro token perplexity", lambda s: fmt(s["macro_token_perplexity"])),
        ("documents (skipped)", lambda s: f"{s['documents']:,} ({s['skipped_documents']:,})"),
        ("tokens scored", lambda s: f"{s['tokens']:,}"),
        ("scored tokens/s", lambda s: fmt(s.get("tokens_per_second"), 0)),
    ]
    if any("word_perplexity_corrected" in r.summary for r in runs):  # --save-words
        lines.insert(6, ("word perplexity, saved words", lambda s: fmt(s.get("word_perplexity_corrected"))))
    for name in SIGNALS:
        if any(name in (r.summary.get("signals") or {}) for r in runs):
            lines.append((f"{name} (mean, 95% interval)", lambda s, name=name: signal_mean(s, name)))
    if any("reference" in r.summary for r in runs):
        lines += [
            ("reference model", lambda s: s.get("reference", {}).get("model", {}).get("id", "")),
            ("mean KL(P || Q)", lambda s: ref(s, "kld_mean")),
            ("same top token", lambda s: ref(s, "same_top_p")),
            ("PPL(Q) / PPL(ref)", lambda s: ref(s, "ppl_ratio")),
        ]
    return [(name, [str(get(r.summary)) for r in runs]) for name, get in lines]


def signal_mean(summary: dict, name: str) -> str:
    stat = (summary.get("signals") or {}).get(name)
    if not stat:
        return ""
    ci = stat["bootstrap"]
    return f"{stat['mean']:.4g}" + (f" ({ci[0]:.4g} – {ci[1]:.4g})" if ci else "")


def ref(summary: dict, key: str) -> str:
    stat = summary.get("reference", {}).get(key)
    return f"{fmt(stat['value'])} ± {fmt(stat['uncertainty'])}" if stat else ""
