"""summary.json: the corpus metrics from one pass over the document rows, what the run was, and its short human form."""

from __future__ import annotations

import hashlib
import math
import os
import platform
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata

from ..config import ENGINE_PERFORMANCE_ARGS, Config, parse_engine_args, public_url
from ..data.records import MISSING_GROUP, SOURCE_KEYS
from ..data.sources import Source
from ..engine.conventions import Windowing
from ..errors import EXIT_DATA, PplError
from .estimates import corpus_estimate, group_interval, macro_estimate, rate
from .kl_statistics import HISTOGRAMS, Histogram, reference_summary
from .metrics import accumulate, perplexity, unit_metrics


@dataclass(frozen=True)
class Unscored:
    """What a run read but did not score, besides empty documents: documents too short for
    --lengths (they are counted as skipped too), and with --skip-bad-records the records it passed
    over ({"count": N, "first": [{"record", "error"}, ...]}; None without the option)."""

    short: int = 0
    bad: dict | None = None
    longest_short: int = 0  # the most tokens of those too short


def build_summary(
    config: Config,
    rows: Iterable[dict],
    skipped: Mapping[str | None, int],
    model_info: dict,
    data_info: dict,
    windowing: Windowing,
    timings: dict,
    reference_info: dict | None = None,
    reference: Iterable[dict] = (),
    contexts: Iterable[dict] = (),
    unscored: Unscored = Unscored(),
) -> dict:
    """`rows`: every scored document's row in index order. `skipped`: the documents with nothing to
    score, by group (None: not grouped); `unscored`: of those the ones too short for --lengths, and
    the records --skip-bad-records passed over. `timings`: wall_time_s, scoring_time_s and the
    tokens scored in that time (scored_now), which gives tokens_per_second. With a reference model,
    its description and the documents' lines of reference.jsonl."""
    totals = accumulate(rows, config.bootstrap_samples, config.seed, grouped=config.group_by is not None)
    metrics = totals.metrics()
    if "signals" in metrics:
        metrics["signals"] = {"k": config.min_k, **metrics["signals"]}
    points = metrics.pop("length_points", [])
    scored_now, scoring = timings["scored_now"], timings["scoring_time_s"]
    extra = {"context_curve": context_curve(contexts)}
    if windowing.lengths:
        extra["length_curve"] = length_curve(windowing, points, unscored)
    if unscored.bad is not None:
        extra["bad_records"] = unscored.bad
    if config.save_words:  # the words' surprisals, corrected (unless the correction is off), over the words that have one
        extra["word_perplexity_corrected"] = perplexity(totals.extras.get("word_surprisal_sum", 0.0), int(totals.extras.get("scored_words", 0)))
    if reference_info is not None:
        histograms = {name: Histogram() for name in HISTOGRAMS}
        for line in reference:
            for name, histogram in histograms.items():
                histogram.add(line[name])
        extra["reference"] = reference_summary({**totals.extras, "nll_sum": totals.nll}, totals.tokens, histograms, reference_info)
    if config.conditional:
        extra["conditional"] = conditional_summary(config, totals)
    if config.group_by is not None:
        extra.update(group_summary(config, totals, skipped))
    if "sampling" in data_info:
        extra.update(sampled_summary(config, totals, data_info, extra))
    return {
        **metrics,
        "documents": totals.documents,
        "skipped_documents": sum(skipped.values()),
        "windowing": windowing.describe(),
        **convention_summary({**metrics, **totals.extras}, windowing.convention),
        **extra,
        "model": model_info,
        "data": data_info,
        "config": config.to_dict(),
        "versions": versions(),
        "wall_time_s": timings["wall_time_s"],  # everything: loading data and model, tokenizing, scoring, writing
        "scoring_time_s": scoring,
        # Scored tokens per second of scoring time, counting only what this process scored (not a resume's earlier part).
        "tokens_per_second": scored_now / scoring if scored_now and scoring else None,
    }


def group_summary(config: Config, totals, skipped: Mapping[str | None, int]) -> dict:
    """--group-by: every group's metrics (micro within the group, with the corpus's resampling
    weights), its documents and skipped documents, sorted by name; the macro average over groups."""
    names = sorted(set(totals.groups) | {g for g, n in skipped.items() if g is not None and n})
    groups = {}
    for name in names:
        group = totals.groups.get(name)
        metrics = group.metrics(config.seed) if group is not None else empty_group_metrics()
        if "length_points" in metrics:
            metrics["length_curve"] = [{"length": length, **point} for length, point in zip(config.lengths, metrics.pop("length_points"))]
        groups[name] = {"documents": group.documents if group else 0, "skipped_documents": skipped.get(name, 0), **metrics}
    if names and names == [MISSING_GROUP] and config.group_by not in SOURCE_KEYS:
        raise PplError(f"--group-by {config.group_by}: no record has this field (every document is in {MISSING_GROUP!r})", EXIT_DATA)
    return {
        "group_by": {"key": config.group_by, "groups": len(groups), "missing": MISSING_GROUP},
        "groups": groups,
        "macro": totals.macro(),
    }


def sampled_summary(config: Config, totals, data_info: dict, extra: dict) -> dict:
    """A sampled run (--sample, --sample-per-group): the estimate for the whole input, each group's
    and the macro average's intervals corrected for the sampling, and what was sampled."""
    plan = data_info["sampling"]
    groups = totals.groups if totals.groups is not None else {None: totals}
    rates = {name: rate(plan, name) for name in groups}
    out = {"estimate": {"of": "every document of the input, from the sampled ones", **corpus_estimate(groups, rates, config.seed, config.bootstrap_samples)}}
    if totals.groups is not None:
        for name, group in extra["groups"].items():
            if name in groups:
                group["bootstrap"] = group_interval(groups[name], rates[name], config.seed)
                group["sampled_share"] = rates[name]
        out["macro"] = macro_estimate(groups, rates, config.seed, config.bootstrap_samples)
    out["sampling"] = {**plan, "estimate": True, "population_documents": data_info["documents"]}
    return out


def empty_group_metrics() -> dict:
    """The metrics of a group whose every document was skipped."""
    return {**unit_metrics(0.0, 0, 0, 0), "macro_token_perplexity": None, "bootstrap": None}


def conditional_summary(config: Config, totals) -> dict:
    """What a run of documents scored given a context adds: its mode, the context read, how often a
    context was cut, the scored turns, and with --ifd the continuations scored alone."""
    extras, counts = totals.extras, totals.extra_counts
    out = {
        "mode": config.conditional,
        "context_tokens": int(extras.get("context_tokens", 0)),
        "context_cut_documents": int(extras.get("context_cut", 0)),
    }
    if config.conditional == "conversations":
        out["turns"] = int(extras.get("turns", 0))
        out["score_roles"] = list(config.score_roles)
    if config.ifd:
        alone = extras.get("unconditional_nll_sum", 0.0)
        out["ifd"] = {
            "unconditional_nll_sum": alone,
            "unconditional_token_perplexity": perplexity(alone, totals.tokens),
            "corpus_ifd": totals.nll / alone if alone > 0 else None,
            "mean_ifd": extras["ifd"] / counts["ifd"] if counts.get("ifd") else None,
        }
    return out


def length_curve(windowing: Windowing, points: list[dict], unscored: Unscored) -> dict:
    """--lengths: how the lengths were scored and, for each, its documents and metrics with intervals."""
    described = windowing.describe()
    if not points:  # no document reached any length (a shard of short documents)
        points = [{"documents": 0, "tokens": 0, "nll_sum": 0.0, "token_perplexity": None, "mean_document_perplexity": None,
                   "bits_per_byte": None, "bootstrap": None} for _ in windowing.lengths]  # fmt: skip
    return {
        "protocol": windowing.protocol,
        "passes": described["passes"],
        **({"length_dependence": windowing.length_dependence} if windowing.length_dependence else {}),
        "min_tokens": windowing.min_tokens,
        "too_short_documents": unscored.short,
        "longest_too_short": unscored.longest_short,  # tokens
        "points": [{"length": length, **point} for length, point in zip(windowing.lengths, points)],
    }


def nothing_scored(sources: str, skipped: int, short: int, longest: int, lengths: tuple[int, ...] = (), bar: int = 0) -> str:
    """Why a run scored nothing: every document empty, or too short for --lengths (how many, the
    longest's length against `bar`, the tokens a document needs, and the way out)."""
    if not short or not lengths:
        return f"nothing to score in {sources}: its {counted(skipped, 'document')} are all empty or whitespace only (or a single token without BOS)"
    what = f"the largest length, {bar:,} tokens" if bar == lengths[-1] else f"{bar:,} tokens (--min-tokens)" if bar > lengths[0] else f"the shortest length, {bar:,} tokens"
    empty = f" ({skipped - short:,} of them empty)" if skipped > short else ""
    if longest >= lengths[0]:
        way = f"--min-tokens {lengths[0]:,} scores each document of at least {lengths[0]:,} tokens at the lengths it reaches"
    else:
        way = f"every length is longer than that: choose --lengths of at most {longest:,}"
    return f"nothing to score in {sources}: its {counted(skipped, 'document')} are shorter than {what}{empty}, the longest {longest:,} tokens; {way}"


def context_curve(lines: Iterable[dict]) -> dict:
    """Mean NLL of the scored tokens by how many tokens their window let the model read before them."""
    nll: list[float] = []
    tokens: list[int] = []
    for line in lines:
        for i, (a, n) in enumerate(zip(line["nll"], line["tokens"])):
            if i == len(nll):
                nll.append(0.0)
                tokens.append(0)
            nll[i] += a
            tokens[i] += n
    return {
        "context_tokens": [[2**i, 2 ** (i + 1) - 1] for i in range(len(nll))],
        "mean_nll": [a / n if n else None for a, n in zip(nll, tokens)],
        "tokens": tokens,
    }


def data_description(sources: list[Source], config: Config, documents: int, fingerprint: str, sampling: dict | None = None) -> dict:
    """summary.json's `data`: where the documents came from, how many, their fingerprint, and how
    they were sampled (a sampled run's fingerprint covers the sampled documents)."""
    files = [s for s in sources if s.kind == "file"]
    out = {
        "source": ", ".join(config.data),
        "paths": ", ".join(os.path.abspath(spec) if local_path(spec) else spec for spec in config.data),  # as given, local ones made absolute
        "files": len(files),
        "bytes": sum(s.size or 0 for s in files) if files else None,
        "documents": documents,
        "fingerprint": fingerprint,
    }
    if any(s.kind == "builtin" for s in sources):
        out["python"] = sys.version.split()[0]  # the built-in corpus varies a little between versions
    if any(s.kind == "hub" for s in sources):
        out["streaming"] = config.streaming
    if config.shard:
        out["shard"] = config.shard
    if sampling is not None:
        out["sampling"] = sampling
    return out


def local_path(spec: str) -> bool:
    """A --data value naming local files (a path, a glob of them), not stdin, a URL, a hub dataset or the built-in corpus."""
    if spec == "-" or "://" in spec or ":" in spec.split("/")[0]:
        return False
    return os.path.exists(spec) or (os.sep in spec and os.path.isdir(os.path.dirname(spec)))


def run_identity(
    config: Config, model_info: dict, sources: list[Source], windowing: Windowing, reference_info: dict | None, conditional: dict | None = None,
    words: dict | None = None,
) -> dict:  # fmt: skip
    """What run.json records: what must not change when a run resumes, or between shards to merge.
    `conditional`: how documents are scored given a context (the mode, the chat template's hash);
    `words`: --save-words' field and whether the correction is on."""
    return {
        "model": public_url(config.model),
        "revision": config.revision,
        "dtype": model_info["dtype"],
        **engine_identity(config, model_info),
        **input_identity(sources, config),
        "shard": config.shard,
        "convention": windowing.convention,
        "detokenize": windowing.detokenize,
        "window": windowing.window,
        "stride": windowing.stride,
        "add_bos": windowing.add_bos,
        **({"bos_token_id": windowing.bos_id} if config.bos_token else {}),
        **({"lengths": list(windowing.lengths), "protocol": windowing.protocol, "min_tokens": windowing.min_tokens} if windowing.lengths else {}),
        "reference_model": config.reference_model,
        "reference_dtype": reference_info["dtype"] if reference_info else None,
        "save_tokens": config.save_tokens,
        "conditional": conditional,
        **({"sampling": {"share": config.sample, "per_group": config.sample_per_group, "seed": config.seed}} if config.sampled else {}),
        **({"signals": {"min_k": config.min_k}} if config.signals else {}),
        **({"words": words} if words else {}),
    }


def engine_identity(config: Config, model_info: dict) -> dict:
    """The engine, where it is not transformers (runs made before there were engines record none):
    the --vllm-arg values that can change the numbers (a quantization, the KV cache's dtype), a
    served model's name on its server."""
    if config.engine == "transformers":
        return {}
    if config.engine == "served":
        return {"engine": "served", "served_model": model_info["engine"]["served_model"]}
    arguments = {k: v for k, v in parse_engine_args(config.vllm_args).items() if k not in ENGINE_PERFORMANCE_ARGS}
    return {"engine": config.engine, **({"engine_args": arguments} if arguments else {})}


def input_identity(sources: list[Source], config: Config) -> dict:
    """What run.json records of the input, cheap to know before anything is read: the names and
    sizes of the files and the options that turn records into documents."""
    files = [(s.name, s.size) for s in sources if s.kind == "file"]
    names_and_sizes = hashlib.sha256(repr(files).encode("utf-8")).hexdigest()[:16]
    return {
        "data": list(config.data),
        "data_files": f"{len(files)} files, {sum(size or 0 for _, size in files):,} bytes, names and sizes #{names_and_sizes}",
        "data_options": {
            **{key: getattr(config, key) for key in ("data_config", "split", "streaming", "text_field", "id_field", "doc_split", "encoding_errors", "limit")},
            **{key: getattr(config, key) for key in ("context_field", "context_template", "messages_field", "group_by") if getattr(config, key)},
        },
    }


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("ppl-eval", "torch", "transformers", "tokenizers", "datasets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def convention_summary(totals: dict, convention: str) -> dict:
    """The numbers a convention's own tool reports besides the perplexity, from corpus sums."""
    if convention == "hf-recipe":
        nll, tokens = totals["published_nll_sum"], totals["published_tokens"]
        return {"hf_recipe_published": {"nll_sum": nll, "tokens": tokens, "token_perplexity": perplexity(nll, tokens)}}
    if convention == "llama-cpp":
        return {"llama_cpp_uncertainty": llama_cpp_uncertainty(totals["nll_sum"], totals["nll_sq_sum"], totals["tokens"])}
    return {}


def llama_cpp_uncertainty(nll_sum: float, nll_sq_sum: float, count: int) -> float | None:
    """llama-perplexity's '+/-': ppl * sqrt(var(nll) / (count - 1)), var over the scored tokens."""
    if count < 2:
        return None
    mean = nll_sum / count
    variance = nll_sq_sum / count - mean * mean
    return math.exp(mean) * math.sqrt(max(variance, 0.0) / (count - 1))


def format_summary(summary: dict) -> str:
    """A few lines for a person; summary.json has everything."""
    boot = summary.get("bootstrap") or {}

    def ci(key):
        return interval_text(boot, key)

    skipped = summary["skipped_documents"]
    short = (summary.get("length_curve") or {}).get("too_short_documents", 0)
    bad = (summary.get("bad_records") or {}).get("count", 0)
    lines = [
        f"{summary['model']['id']} on {summary['data']['source']}: {counted(summary['documents'], 'document')}"
        + (f" ({skipped - short:,} empty skipped)" if skipped - short else "")
        + (f" ({bad:,} bad record{'s' * (bad != 1)} skipped, the first: {summary['bad_records']['first'][0]['error']})" if bad else "")
        + f", {counted(summary['tokens'], 'token')} scored",
        f"token perplexity  {number(summary['token_perplexity'])}{ci('token_perplexity')}"
        f"  macro mean {number(summary['macro_token_perplexity'])}",
        f"word perplexity   {number(summary['word_perplexity'])}",
        f"byte perplexity   {number(summary['byte_perplexity'])}",
        f"bits per byte     {number(summary['bits_per_byte'])}{ci('bits_per_byte')}",
    ]
    if "word_perplexity_corrected" in summary:  # --save-words
        correction = "corrected at word starts" if summary["bow_correction"]["on"] else "plain sums, no correction"
        lines.insert(3, f"word perplexity   {number(summary['word_perplexity_corrected'])} from the saved words ({correction})")
    conditional = summary.get("conditional")
    if conditional:
        cut = conditional["context_cut_documents"]
        lines.append(
            f"scored given a context ({conditional['mode']}): {conditional['context_tokens']:,} context tokens read"
            + (f", {conditional['turns']:,} turns scored" if "turns" in conditional else "")
            + (f", {cut:,} contexts cut to fit the window" if cut else "")
        )
        if "ifd" in conditional:
            ifd = conditional["ifd"]
            lines.append(f"IFD               {number(ifd['mean_ifd'])} mean over documents, {number(ifd['corpus_ifd'])} over the corpus")
    if "signals" in summary:
        lines.append(signal_line(summary["signals"]))
    if "length_curve" in summary:
        lines += length_lines(summary["length_curve"])
    if "estimate" in summary:
        estimate, plan = summary["estimate"], summary["sampling"]
        interval = (estimate.get("bootstrap") or {}).get("token_perplexity")
        how = f"{plan['per_group']:,} documents a group" if plan["method"] == "per-group" else f"{plan['share']:g} of the documents"
        lines.append(
            f"estimate for all {plan['population_documents']:,} documents (sampled: {how}, seed {plan['seed']}):"
            f" token perplexity {number(estimate['token_perplexity'])}"
            + (f"  (95% CI {number(interval[0])} - {number(interval[1])})" if interval else "")
            + f", bits per byte {number(estimate['bits_per_byte'])}"
        )
    if "groups" in summary:
        lines += group_lines(summary)
    speed = f"{summary['tokens_per_second']:,.0f} tokens/s scoring" if summary["tokens_per_second"] else "nothing left to score: an earlier run had finished every document"
    lines += [f"{summary['wall_time_s']:.1f} s in all, {speed}" + (f"; reports in {summary['config']['output']}" if summary["config"]["output"] else "")]
    return "\n".join(lines)


def interval_text(boot: dict, key: str) -> str:
    """'  (95% CI low - high, N documents)', or why there is none ('  (95% CI n/a: one document)')."""
    interval = boot.get(key)
    if interval:
        documents = f", {counted(boot['documents'], 'document')}" if "documents" in boot else ""
        return f"  (95% CI {number(interval[0])} - {number(interval[1])}{documents})"
    return f"  (95% CI n/a: {boot['missing']})" if boot.get("missing") else ""


def interval_cell(boot: dict, key: str, before: str) -> str:
    """A table's '(low - high)' after `before`, or why there is none ('(n/a: one document)'), or nothing."""
    interval = boot.get(key)
    if interval:
        return f"{before}({number(interval[0])} - {number(interval[1])})"
    return f"{before}(n/a: {boot['missing']})" if boot.get("missing") else ""


def counted(n: int, noun: str) -> str:
    """'1 document', '2,345 documents'."""
    return f"{n:,} {noun}{'s' * (n != 1)}"


def length_lines(curve: dict) -> list[str]:
    """A line per --lengths length: documents, token perplexity with its interval, the mean of the
    documents' perplexities, bits per byte."""
    how = f"{curve['protocol']} protocol, {'one pass' if curve['passes'] == 'one' else 'a pass per length'}"
    short = curve["too_short_documents"]
    lines = [
        f"by context length ({how}; documents of at least {curve['min_tokens']:,} tokens"
        + (f", {short:,} shorter skipped" if short else "") + "):",
        f"  {'length':>8}  {'documents':>9}  {'token perplexity (95% CI)':<34}  {'mean document ppl':>17}  {'bits/byte':>9}",
    ]  # fmt: skip
    for p in curve["points"]:
        ppl = number(p["token_perplexity"]) + interval_cell(p.get("bootstrap") or {}, "token_perplexity", " ")
        lines.append(f"  {p['length']:>8,}  {p['documents']:>9,}  {ppl:<34}  {number(p['mean_document_perplexity']):>17}  {number(p['bits_per_byte']):>9}")
    return lines


SIGNAL_LABELS = {"min_k": "Min-K%", "min_k_plus_plus": "Min-K%++", "zlib_ratio": "zlib ratio", "mean_entropy": "entropy", "reference_ratio": "reference ratio"}


def signal_line(signals: dict) -> str:
    """The signals' means over documents, on one line."""
    means = "  ".join(f"{label} {signals[name]['mean']:.4g}" for name, label in SIGNAL_LABELS.items() if name in signals)
    return f"signals (k {signals['k']:g}, means over documents)  {means}"


GROUPS_SHOWN = 10  # the printed summary lists the worst groups, then says how many more there are


def group_lines(summary: dict) -> list[str]:
    """The groups by token perplexity, the worst first, a bounded number; the macro average."""
    groups = summary["groups"]
    ranked = sorted(groups.items(), key=lambda kv: -(kv[1]["token_perplexity"] if kv[1]["token_perplexity"] is not None else -1))
    macro = summary["macro"]
    boot = macro.get("bootstrap") or {}
    lines = [
        f"{len(groups):,} groups by {summary['group_by']['key']}; macro mean token perplexity {number(macro['token_perplexity'])}"
        + interval_text(boot, "token_perplexity")
        + f", bits per byte {number(macro['bits_per_byte'])}"
    ]
    width = min(max(len(name) for name in groups), 40)
    for name, g in ranked[:GROUPS_SHOWN]:
        lines.append(
            f"  {name[:40]:{width}}  {number(g['token_perplexity'])}"
            + interval_cell(g.get("bootstrap") or {}, "token_perplexity", "  ")
            + f"  {counted(g['documents'], 'document')}, {g['tokens']:,} tokens"
        )
    if len(ranked) > GROUPS_SHOWN:
        lines.append(f"  and {len(ranked) - GROUPS_SHOWN:,} more (summary.json has every group)")
    return lines


def number(value) -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "inf"
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
