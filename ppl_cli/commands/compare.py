"""`ppl-eval compare`: is run B better than run A, or only different by chance?

The runs are result directories of `run` or `merge` over the same documents. One pass over their
documents.jsonl files (joined on the document index) accumulates each run's sums and, for every
bootstrap resample, the same Poisson(1) document weights applied to every run: a paired
bootstrap, so a difference is judged against the noise of the documents both runs scored.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..data.records import MISSING_GROUP
from ..engine.conventions import Windowing
from ..errors import EXIT_DATA, PplError
from ..output.metrics import BOOTSTRAP_ELEMENTS, LN2, poisson_weights
from ..output.run_directory import DOCUMENTS_FILE, SERIES_FILE, SUMMARY_FILE, read_rows
from ..output.signals import SIGNALS
from ..output.summary import counted

METRICS = ("token_perplexity", "bits_per_byte", "word_perplexity", "byte_perplexity")
WORD_METRIC = "word_perplexity_corrected"  # compared where every run saved words (--save-words)
SUMS = ("nll_sum", "tokens", "words", "bytes", "word_surprisal_sum", "scored_words")  # a row's sums, the columns of PairedSums
METRIC_SUMS = {  # each metric's numerator and denominator among SUMS
    "token_perplexity": (0, 1),
    "bits_per_byte": (0, 3),
    "word_perplexity": (0, 2),
    "byte_perplexity": (0, 3),
    WORD_METRIC: (4, 5),
}
SAME_RUN_KEYS = ("convention", "window", "step", "add_bos", "detokenize")
GROUP_METRICS = ("token_perplexity", "bits_per_byte")  # compared per group (memory: 6 sums x runs x resamples a group)
ALPHA = 0.05  # "significant" after Holm's adjustment
EXACT_DOCUMENTS = 12  # up to this many documents, p-values come from every sign pattern (2^12 = 4,096), exactly


@dataclass(frozen=True)
class CompareConfig:
    runs: tuple[str, ...]  # result directories; the first is the baseline
    allow_different_data: bool = False
    allow_different_windowing: bool = False  # the same documents under other windows, conventions or framing (--chat-wrap)
    bootstrap_samples: int = 1000
    seed: int = 0
    top: int = 5  # documents listed as most improved and most worsened

    def __post_init__(self):
        if not self.runs:
            raise PplError("compare needs at least two result directories (the baseline, then the others), or a series directory")
        if self.bootstrap_samples < 1:
            raise PplError("bootstrap-samples must be at least 1")
        if self.top < 0:
            raise PplError("top must be 0 or more")


@dataclass
class Run:
    path: Path
    summary: dict

    @property
    def name(self) -> str:
        return str(self.path)


def metric_value(metric: str, nll: np.ndarray | float, units: np.ndarray | float):
    """A corpus metric from an NLL sum and its units (vectorised over resamples)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if metric == "bits_per_byte":
            return nll / (units * LN2)
        return np.exp(nll / units)


def compare_runs(config: CompareConfig) -> dict:
    """Each run against the first; a series directory alone: each checkpoint against the one before."""
    if len(config.runs) == 1:
        if (Path(config.runs[0]) / SERIES_FILE).is_file():
            return compare_series(config)
        raise PplError("compare needs at least two result directories (the baseline, then the others), or a series directory")
    runs = [read_run(Path(p)) for p in config.runs]
    matched = check_comparable(runs, config)
    lengths = LengthView.of(runs)
    totals = PairedTotals(len(runs), config.bootstrap_samples, config.seed, config.top, "groups" in runs[0].summary, lengths)
    for rows in joined_rows(runs, matched):
        totals.add(rows)
    if totals.documents == 0:
        where = f" at length {lengths.lengths[-1]:,}" if lengths else ""
        raise PplError(f"the runs have no scored document in common{where}", EXIT_DATA)
    return totals.report(runs, matched)


class LengthView:
    """Runs made with --lengths, compared at the lengths they share: each document's numbers there,
    and (for the corpus metrics) at the largest of them, over the documents every run has there."""

    def __init__(self, lengths: list[int], positions: list[list[int]]):
        self.lengths = lengths  # the lengths every run has, ascending
        self.positions = positions  # for each run, where each of them is in its own lengths

    @classmethod
    def of(cls, runs: list[Run]) -> LengthView | None:
        given = [run.summary["windowing"].get("lengths") for run in runs]
        if not any(given):
            return None
        common = sorted(set.intersection(*(set(g or ()) for g in given)))
        if not common:
            raise PplError(f"{runs[0].name} and the other runs share no context length (--lengths); nothing to compare", EXIT_DATA)
        return cls(common, [[g.index(length) for length in common] for g in given])

    def values(self, rows: list[dict]) -> np.ndarray:
        """[K, R, 4]: each shared length's NLL, tokens, bytes and token perplexity in every run (NaN where a run's document is shorter)."""
        out = np.full((len(self.lengths), len(rows), 4), np.nan)
        for r, (row, positions) in enumerate(zip(rows, self.positions)):
            at = row["lengths"]
            for k, i in enumerate(positions):
                if at["nll"][i] is not None:
                    out[k, r] = (at["nll"][i], at["tokens"][i], at["bytes"][i], math.exp(min(at["nll"][i] / at["tokens"][i], 709.0)))
        return out

    def corpus_rows(self, rows: list[dict]) -> list[dict] | None:
        """The rows as the corpus metrics compare them: at the largest shared length (None: a run's document is shorter)."""
        out = []
        for row, positions in zip(rows, self.positions):
            at, i = row["lengths"], positions[-1]
            if at["nll"][i] is None:
                return None
            out.append({**row, "nll_sum": at["nll"][i], "tokens": at["tokens"][i], "words": at["words"][i], "bytes": at["bytes"][i]})
        return out


def compare_series(config: CompareConfig) -> dict:
    """A series (run --model several times, a glob, --revisions): every checkpoint's numbers by step,
    and its paired difference from the checkpoint before it."""
    folder = Path(config.runs[0])
    series = read_series(folder)
    checkpoints = []
    previous = None
    for c in series["series"]:
        summary = read_run(folder / c["dir"]).summary
        entry = {"name": c["name"], "step": c["step"], "documents": summary["documents"]}
        for metric in GROUP_METRICS:
            entry[metric] = {"value": summary[metric], "ci": (summary.get("bootstrap") or {}).get(metric)}
        if previous is not None:
            pair = compare_runs(replace(config, runs=(str(folder / previous), str(folder / c["dir"]))))
            entry["against_previous"] = {metric: pair[metric] for metric in GROUP_METRICS}
        checkpoints.append(entry)
        previous = c["dir"]
    return {"series": str(folder), "checkpoints": checkpoints, "bootstrap": {"samples": config.bootstrap_samples, "seed": config.seed, "method": "paired poisson"}}


def read_series(folder: Path) -> dict:
    try:
        series = json.loads((folder / SERIES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise PplError(f"{folder / SERIES_FILE} is unreadable", EXIT_DATA) from None
    if not series.get("series"):
        raise PplError(f"{folder} holds a series with no finished checkpoint", EXIT_DATA)
    return series


def read_run(path: Path) -> Run:
    for name in (SUMMARY_FILE, DOCUMENTS_FILE):
        if not (path / name).is_file():
            raise PplError(f"{path} is not a finished ppl-eval run: no {name}", EXIT_DATA)
    try:
        summary = json.loads((path / SUMMARY_FILE).read_text(encoding="utf-8"))
    except ValueError:
        raise PplError(f"{path / SUMMARY_FILE} is not valid JSON", EXIT_DATA) from None
    return Run(path, summary)


def check_comparable(runs: list[Run], config: CompareConfig) -> bool:
    """Refuse runs that scored different documents, or scored them differently, naming the
    difference. Returns whether documents are matched by index and id (different data allowed).
    Runs with --lengths may differ in their lengths (they are compared at the ones they share),
    not in how a length is scored."""
    base = runs[0]
    different = False
    for run in runs[1:]:
        keys = (*SAME_RUN_KEYS, "conditional", "protocol")
        if base.summary["windowing"].get("lengths") and run.summary["windowing"].get("lengths"):
            keys = tuple(k for k in keys if k not in ("window", "step")) + (("stride",) if base.summary["windowing"]["protocol"] == "sliding" else ())
        for key in keys if not config.allow_different_windowing else ():
            a, b = windowing_value(base, key), windowing_value(run, key)
            if a != b:
                raise PplError(
                    f"{run.name} and {base.name} scored the documents differently: {key} {b!r} vs {a!r};"
                    " --allow-different-windowing compares them anyway",
                    EXIT_DATA,
                )
        a, b = base.summary["data"]["fingerprint"], run.summary["data"]["fingerprint"]
        if a != b:
            if not config.allow_different_data:
                raise PplError(
                    f"{run.name} and {base.name} scored different data (fingerprint {b[:23]}... vs {a[:23]}...);"
                    " --allow-different-data compares the documents both scored",
                    EXIT_DATA,
                )
            different = True
    return different


def windowing_value(run: Run, key: str):
    """A windowing setting of a run; `step` is compared rather than `stride` (two strides can make the
    same windows), taken as Windowing computes it where a summary does not record it."""
    if key == "conditional":  # a prompt, a conversation or --chat-wrap: which tokens are scored
        return (run.summary.get("conditional") or {}).get("mode")
    described = run.summary["windowing"]
    if key == "step" and key not in described:
        return Windowing.from_description(described).step
    return described.get(key, "none" if key == "detokenize" else None)


def joined_rows(runs: list[Run], by_id: bool) -> Iterator[list[dict]]:
    """The rows of each document every run scored, in index order (each documents.jsonl is).

    With the same data every run holds the same indices; with --allow-different-data a document
    is the same when its index and its id are.
    """
    streams = [read_rows(run.path / DOCUMENTS_FILE) for run in runs]
    heads = [next(s, None) for s in streams]
    while all(h is not None for h in heads):
        index = min(h["index"] for h in heads)
        if all(h["index"] == index for h in heads) and (not by_id or len({h["id"] for h in heads}) == 1):
            yield heads
        heads = [next(s, None) if h["index"] == index else h for h, s in zip(heads, streams)]


class PairedSums:
    """Each run's sums over a set of documents (SUMS) and over each resample."""

    def __init__(self, runs: int, samples: int):
        self.sums = np.zeros((runs, len(SUMS)))
        self.resampled = np.zeros((samples, runs, len(SUMS)))
        self.documents = 0
        self.few = Few()

    def add(self, values: np.ndarray, weights: np.ndarray) -> None:
        """`values` [m, R, 6]: m documents' sums in every run; `weights` [B, m]: their resampling weights."""
        self.sums += values.sum(axis=0)
        self.resampled += np.einsum("bm,mrk->brk", weights, values)
        self.documents += len(values)
        self.few.add(values)

    def paired(self, metric: str, r: int) -> dict:
        """Both values, their difference, its 95% paired bootstrap interval and a two-sided p-value
        (exact, from every sign pattern, up to EXACT_DOCUMENTS documents)."""
        nll, unit = METRIC_SUMS[metric]
        a = float(metric_value(metric, self.sums[0, nll], self.sums[0, unit]))
        b = float(metric_value(metric, self.sums[r, nll], self.sums[r, unit]))
        resampled_a = metric_value(metric, self.resampled[:, 0, nll], self.resampled[:, 0, unit])
        resampled_b = metric_value(metric, self.resampled[:, r, nll], self.resampled[:, r, unit])
        exact = self.few.values()
        if exact is not None:
            statistic = lambda sums: metric_value(metric, sums[:, 0], sums[:, 1])  # noqa: E731
            exact = sign_flip_p(exact[:, 0][:, [nll, unit]], exact[:, r][:, [nll, unit]], statistic)
        return paired_difference(a, b, resampled_b - resampled_a, self.documents, exact)


class Few:
    """The first documents' values, while there are at most EXACT_DOCUMENTS of them (for the exact test)."""

    def __init__(self):
        self.kept: list[np.ndarray] = []
        self.count = 0

    def add(self, values: np.ndarray) -> None:
        self.count += len(values)
        if self.count <= EXACT_DOCUMENTS:
            self.kept.append(values)
        else:
            self.kept = []

    def values(self) -> np.ndarray | None:
        """[n, ...] every document's values, or None where there are more than EXACT_DOCUMENTS (or none)."""
        return np.concatenate(self.kept) if self.kept and self.count <= EXACT_DOCUMENTS else None


def sign_flip_p(a: np.ndarray, b: np.ndarray, statistic) -> float | None:
    """The paired sign-flip permutation test, exactly: every one of the 2^n patterns of swapping
    document i's two runs or not; the two-sided p-value is the share of patterns whose difference
    statistic(B sums) - statistic(A sums) is at least as far from zero as the observed one (the
    pattern that swaps nothing); None where the observed difference is not finite. `a`, `b` [n, k]:
    each document's sums in the two runs. With n documents the smallest p is 2 / 2^n (the observed
    pattern and its mirror): 0.25 for 3."""
    n = len(a)
    swap = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(bool)[:, :, None]  # [P, n, 1]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        differences = statistic(np.where(swap, a, b).sum(axis=1)) - statistic(np.where(swap, b, a).sum(axis=1))  # [P]
    observed = abs(differences[0])
    if not math.isfinite(observed):
        return None
    return float(np.mean(np.abs(differences) >= observed * (1 - 1e-12)))


def paired_difference(a: float, b: float, deltas: np.ndarray, documents: int, exact: float | None = None) -> dict:
    """Both values, b - a, the 95% percentile interval of the resampled differences (the finite
    ones) and the paired p-value (`exact`, the sign-flip test's, where given; else the bootstrap's);
    no interval where the difference or every resample is not finite, or from one document (a
    resample holds it or nothing)."""
    deltas = deltas[np.isfinite(deltas)]
    delta = b - a
    out = {"a": a, "b": b, "delta": delta, "ci": None, "p_value": None, "documents": documents}
    if not math.isfinite(delta):
        return out
    if exact is not None:
        out.update(p_value=exact, test="exact sign-flip permutation")
    if documents < 2:
        return {**out, "ci_missing": "one document"}
    if not len(deltas):
        return out
    out["ci"] = [float(np.percentile(deltas, 2.5)), float(np.percentile(deltas, 97.5))]
    if exact is None:
        out.update(p_value=paired_p_value(deltas, delta), test="paired bootstrap")
    return out


class PairedMeans:
    """Each run's mean of every --signals value over the documents that have it in every run, and
    the same means in each resample (sum w s / sum w, the documents' weights shared by the runs)."""

    def __init__(self, runs: int, samples: int):
        self.sums = np.zeros((runs, len(SIGNALS)))
        self.counts = np.zeros(len(SIGNALS))
        self.resampled = np.zeros((samples, runs, len(SIGNALS)))
        self.resampled_counts = np.zeros((samples, len(SIGNALS)))
        self.few = Few()

    def add(self, values: np.ndarray, weights: np.ndarray) -> None:
        """`values` [m, R, S]: the documents' signals in every run, NaN where a run has none."""
        present = ~np.isnan(values).any(axis=1)  # [m, S]: in every run
        filled = np.where(present[:, None, :], values, 0.0)
        self.sums += filled.sum(axis=0)
        self.counts += present.sum(axis=0)
        self.resampled += np.einsum("bm,mrs->brs", weights, filled)
        self.resampled_counts += weights @ present
        self.few.add(values)

    def paired(self, r: int) -> dict:
        """Per signal every run has: both means, their difference, its 95% paired interval and p-value."""
        out = {}
        few = self.few.values()
        for s, name in enumerate(SIGNALS):
            if not self.counts[s]:
                continue
            a, b = self.sums[0, s] / self.counts[s], self.sums[r, s] / self.counts[s]
            drawn = self.resampled_counts[:, s] > 0
            deltas = (self.resampled[drawn, r, s] - self.resampled[drawn, 0, s]) / self.resampled_counts[drawn, s]
            exact = None
            if few is not None:
                values = few[~np.isnan(few[:, :, s]).any(axis=1)][:, :, s]  # [n, R]: the documents every run has it for
                ones = np.ones(len(values))
                exact = sign_flip_p(np.stack([values[:, 0], ones], 1), np.stack([values[:, r], ones], 1), lambda sums: sums[:, 0] / sums[:, 1])
            out[name] = paired_difference(float(a), float(b), deltas, int(self.counts[s]), exact)
        return out


class PairedLengths:
    """Runs with --lengths: at each shared length, every run's sums over the documents all of them
    have there (NLL, tokens, bytes, the documents' perplexities), and the same in each resample."""

    def __init__(self, lengths: int, runs: int, samples: int):
        self.sums = np.zeros((lengths, runs, 4))
        self.counts = np.zeros(lengths)
        self.resampled = np.zeros((samples, lengths, runs, 4))
        self.resampled_counts = np.zeros((samples, lengths))
        self.few = Few()

    def add(self, values: np.ndarray, weights: np.ndarray) -> None:
        """`values` [m, K, R, 4] (NaN where a run's document is shorter); `weights` [B, m]."""
        present = ~np.isnan(values).any(axis=(2, 3))  # [m, K]: in every run
        filled = np.where(present[:, :, None, None], values, 0.0)
        self.sums += filled.sum(axis=0)
        self.counts += present.sum(axis=0)
        self.resampled += np.einsum("bm,mkrc->bkrc", weights, filled)
        self.resampled_counts += weights @ present
        self.few.add(values)

    def exact(self, k: int, r: int) -> dict[str, float | None] | None:
        """At length k, the sign-flip test's p-values of the three metrics, where there are few documents."""
        few = self.few.values()
        if few is None:
            return None
        values = few[~np.isnan(few[:, k]).any(axis=(1, 2)), k]  # [n, R, 4]: the documents every run has at length k
        a, b = values[:, 0], values[:, r]
        ones = np.ones((len(values), 1))
        return {
            "token_perplexity": sign_flip_p(a[:, [0, 1]], b[:, [0, 1]], lambda sums: np.exp(sums[:, 0] / sums[:, 1])),
            "mean_document_perplexity": sign_flip_p(np.hstack([a[:, [3]], ones]), np.hstack([b[:, [3]], ones]), lambda sums: sums[:, 0] / sums[:, 1]),
            "bits_per_byte": sign_flip_p(a[:, [0, 2]], b[:, [0, 2]], lambda sums: sums[:, 0] / (sums[:, 1] * LN2)),
        }

    def paired(self, k: int, r: int) -> dict:
        """At length k, run r against the baseline: documents, and for token perplexity, the mean of
        the documents' perplexities and bits per byte both values, the difference, its interval and p-value."""
        (nll, tokens, n_bytes, ppl), (base_nll, base_tokens, base_bytes, base_ppl) = self.sums[k, r], self.sums[k, 0]
        b = self.resampled[:, k, r, :].T  # [4, B]
        a = self.resampled[:, k, 0, :].T
        drawn = self.resampled_counts[:, k]
        documents = int(self.counts[k])
        out: dict = {"documents": documents}
        if not documents:
            return out
        exact = self.exact(k, r) or {}
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            out["token_perplexity"] = paired_difference(
                math.exp(base_nll / base_tokens), math.exp(nll / tokens), np.exp(b[0] / b[1]) - np.exp(a[0] / a[1]), documents, exact.get("token_perplexity")
            )
            out["mean_document_perplexity"] = paired_difference(
                base_ppl / self.counts[k], ppl / self.counts[k], (b[3] - a[3]) / drawn, documents, exact.get("mean_document_perplexity")
            )
            out["bits_per_byte"] = paired_difference(
                base_nll / (base_bytes * LN2), nll / (n_bytes * LN2), (b[0] / b[2] - a[0] / a[2]) / LN2, documents, exact.get("bits_per_byte")
            )
        return out


class PairedTotals:
    """Sums per run, the same Poisson resamples for every run, and the most changed documents; with
    groups (the baseline rows' `group`), the same per group, with the same weights; with --lengths,
    the corpus metrics at the largest shared length and every shared length's paired numbers."""

    def __init__(self, runs: int, samples: int, seed: int, top: int, grouped: bool = False, lengths: LengthView | None = None):
        self.runs, self.samples, self.top = runs, samples, top
        self.length_view = lengths
        self.lengths = PairedLengths(len(lengths.lengths), runs, samples) if lengths else None
        self.pending_lengths: list[np.ndarray] = []
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.chunk = max(1, BOOTSTRAP_ELEMENTS // samples)
        self.pending: list[np.ndarray] = []
        self.pending_groups: list[str] = []
        self.pending_signals: list[np.ndarray] = []
        self.corpus = PairedSums(runs, samples)
        self.signals = PairedMeans(runs, samples)
        self.groups: dict[str, PairedSums] | None = {} if grouped else None
        self.documents = 0
        self.better = np.zeros(runs, dtype=np.int64)  # documents whose NLL per token went down against the baseline
        self.worse = np.zeros(runs, dtype=np.int64)
        self.improved: list[list] = [[] for _ in range(runs)]  # heaps of (-change, index, id)
        self.worsened: list[list] = [[] for _ in range(runs)]

    def add(self, rows: list[dict]) -> None:
        if self.length_view is not None:
            self.pending_lengths.append(self.length_view.values(rows))
            rows = self.length_view.corpus_rows(rows)
            if rows is None:  # shorter than the largest shared length in some run: compared at the lengths it has
                if len(self.pending_lengths) == self.chunk:
                    self.flush()
                return
        values = np.array([[r.get(k, 0.0) for k in SUMS] for r in rows], dtype=np.float64)  # [R, 6]; no words saved: 0
        self.pending.append(values)
        self.pending_signals.append(np.array([[np.nan if r.get(s) is None else r[s] for s in SIGNALS] for r in rows], dtype=np.float64))  # [R, S]
        if self.groups is not None:
            self.pending_groups.append(rows[0].get("group", MISSING_GROUP))
        self.documents += 1
        base = rows[0]
        for r in range(1, self.runs):
            row = rows[r]
            if not (row["tokens"] and base["tokens"]):
                continue
            change = row["nll_sum"] / row["tokens"] - base["nll_sum"] / base["tokens"]  # nats per token
            self.better[r] += change < 0
            self.worse[r] += change > 0
            keep(self.improved[r], (-change, -row["index"], row["index"], row["id"]), self.top)
            keep(self.worsened[r], (change, -row["index"], row["index"], row["id"]), self.top)
        if max(len(self.pending), len(self.pending_lengths)) == self.chunk:
            self.flush()

    def flush(self) -> None:
        """Draw the pending documents' weights and add them up (with --lengths, every joined document
        is drawn; the corpus sums take those that reach the largest shared length)."""
        drawn = len(self.pending_lengths) if self.lengths is not None else len(self.pending)
        if not drawn:
            return
        weights = poisson_weights(self.rng, (self.samples, drawn))  # [B, m]
        if self.lengths is not None:
            self.lengths.add(np.stack(self.pending_lengths), weights)
            at_top = [k for k, v in enumerate(self.pending_lengths) if not np.isnan(v[-1]).any()]
            weights = weights[:, at_top]
            self.pending_lengths = []
        if not self.pending:
            return
        values = np.stack(self.pending)  # [m, R, 6]
        self.corpus.add(values, weights)
        self.signals.add(np.stack(self.pending_signals), weights)
        if self.groups is not None:
            members: dict[str, list[int]] = {}
            for k, name in enumerate(self.pending_groups):
                members.setdefault(name, []).append(k)
            for name, ks in members.items():
                at = np.array(ks)
                self.groups.setdefault(name, PairedSums(self.runs, self.samples)).add(values[at], weights[:, at])
        self.pending, self.pending_groups, self.pending_signals = [], [], []

    def report(self, runs: list[Run], matched_by_id: bool) -> dict:
        self.flush()
        metrics = METRICS + ((WORD_METRIC,) if all(WORD_METRIC in run.summary for run in runs) else ())
        out = []
        for r in range(1, self.runs):
            entry = {"baseline": runs[0].name, "run": runs[r].name, "engine": engine_of(runs[r].summary)}
            for metric in metrics:
                entry[metric] = self.corpus.paired(metric, r)
            scored = int(self.better[r] + self.worse[r])
            entry["documents"] = {
                "compared": self.documents,
                "better": int(self.better[r]),
                "worse": int(self.worse[r]),
                "better_share": self.better[r] / self.documents,
                "unchanged": self.documents - scored,
                "baseline_documents": runs[0].summary["documents"],
                "run_documents": runs[r].summary["documents"],
            }
            signals = self.signals.paired(r)
            if signals:
                entry["signals"] = signals
            if self.lengths is not None:
                entry["length_curve"] = [{"length": length, **self.lengths.paired(k, r)} for k, length in enumerate(self.length_view.lengths)]
                entry["documents"]["at_length"] = self.length_view.lengths[-1]
            entry["most_improved"] = listed(self.improved[r], improved=True)
            entry["most_worsened"] = listed(self.worsened[r], improved=False)
            if self.groups is not None:
                entry.update(self.group_report(r))
            out.append(entry)
        report = {**{k: v for k, v in out[0].items() if k not in ("baseline", "run", "engine")}} if len(out) == 1 else {}
        return {
            "baseline": runs[0].name,
            "baseline_engine": engine_of(runs[0].summary),
            "runs": out,
            **report,
            "bootstrap": {"samples": self.samples, "seed": self.seed, "method": "paired poisson", "confidence": 0.95},
            "matched_by": "index and id" if matched_by_id else "index",
        }

    def group_report(self, r: int) -> dict:
        """Every group's paired comparison of run r with the baseline, and Holm-adjusted p-values
        across the groups, a metric at a time."""
        names = sorted(self.groups)
        groups = [{"group": name, "documents": self.groups[name].documents} for name in names]
        significant = {}
        for metric in GROUP_METRICS:
            results = [self.groups[name].paired(metric, r) for name in names]
            adjusted = holm([m["p_value"] for m in results])
            for g, m, p in zip(groups, results, adjusted):
                g[metric] = {**m, "p_holm": p}
            significant[metric] = sum(p is not None and p < ALPHA for p in adjusted)
        return {
            "groups": groups,
            "groups_significant": {**significant, "of": len(names), "alpha": ALPHA, "adjustment": "holm"},
        }


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment: with the m p-values sorted ascending, p_(i) becomes
    max over j <= i of min(1, (m - j + 1) p_(j)) (j from 1); a missing p-value stays missing and is not counted."""
    present = sorted((p, k) for k, p in enumerate(p_values) if p is not None)
    m = len(present)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for j, (p, k) in enumerate(present):
        running = max(running, min(1.0, (m - j) * p))
        out[k] = running
    return out


def paired_p_value(deltas: np.ndarray, observed: float) -> float:
    """Two-sided: the share of resampled differences, re-centred on zero (the null hypothesis), at
    least as far from zero as the observed one, with +1 smoothing: (1 + #) / (1 + B)."""
    centred = np.abs(deltas - deltas.mean())
    return float((1 + np.count_nonzero(centred >= abs(observed))) / (1 + len(deltas)))


def keep(heap: list, item: tuple, size: int) -> None:
    """Keep the `size` largest items (by their first fields) in a min-heap."""
    if size == 0 or item[0] <= 0:
        return
    if len(heap) < size:
        heapq.heappush(heap, item)
    elif item > heap[0]:
        heapq.heapreplace(heap, item)


def listed(heap: list, improved: bool) -> list[dict]:
    """The kept documents, largest change first; the change is in nats per token, run minus baseline."""
    return [
        {"index": index, "id": doc_id, "change_nats_per_token": -key if improved else key}
        for key, _, index, doc_id in sorted(heap, reverse=True)
    ]


def engine_of(summary: dict) -> str:
    """The engine that scored a run (runs made before there were engines: transformers)."""
    return ((summary.get("model") or {}).get("engine") or {}).get("name", "transformers")


def format_comparison(report: dict) -> str:
    """A few lines for a person."""
    if "checkpoints" in report:
        return format_series_comparison(report)
    engines = {report["baseline_engine"], *(entry["engine"] for entry in report["runs"])} != {"transformers"}
    shown = lambda engine: f" (engine {engine})" if engines else ""  # noqa: E731
    lines = [f"baseline: {report['baseline']}{shown(report['baseline_engine'])}"]
    for entry in report["runs"]:
        docs = entry["documents"]
        lines.append(f"\n{entry['run']}{shown(entry['engine'])} against the baseline, {docs['compared']:,} documents:")
        metrics = shown_metrics(entry)
        width = max(17, *(len(metric) for metric in metrics))
        for metric in metrics:
            m = entry[metric]
            lines.append(f"  {metric.replace('_', ' '):{width}} {number(m['a'])} -> {number(m['b'])}  {signed(m['delta'])}" + interval(m))
        lines.append(f"  better on {docs['better']:,} documents ({docs['better_share']:.0%}), worse on {docs['worse']:,}")
        left_out = max(docs["baseline_documents"], docs["run_documents"]) - docs["compared"]
        if left_out:
            lines.append(
                f"  only documents both runs scored are compared: {docs['compared']:,} of {docs['baseline_documents']:,}"
                f" (baseline) and {docs['run_documents']:,} (this run)"
            )
        for name, m in entry.get("signals", {}).items():
            lines.append(f"  {name:{width}} {m['a']:.4g} -> {m['b']:.4g}  {m['delta']:+.4g}" + interval(m, "+.4g") + "  (mean over documents)")
        if "length_curve" in entry:
            lines.append(f"  the metrics above are at length {docs['at_length']:,}; token perplexity at each shared length (paired):")
            for point in entry["length_curve"]:
                m = point.get("token_perplexity")
                shown = f"{number(m['a'])} -> {number(m['b'])}  {signed(m['delta'])}" + interval(m) if m else "no document reaches it in every run"
                lines.append(f"    {point['length']:>8,}  {point['documents']:>6,} documents  {shown}")
        for label, key in (("most improved", "most_improved"), ("most worsened", "most_worsened")):
            if entry[key]:
                shown = ", ".join(f"{d['id'] or d['index']} ({d['change_nats_per_token']:+.3f})" for d in entry[key])
                lines.append(f"  {label} (nats/token): {shown}")
        if "groups" in entry:
            lines += group_lines(entry)
    return "\n".join(lines)


GROUPS_SHOWN = 10


def group_lines(entry: dict) -> list[str]:
    """Per group: how many differ significantly (Holm), then the groups that changed most in token perplexity."""
    sig = entry["groups_significant"]
    lines = [
        f"  per group: token perplexity differs in {sig['token_perplexity']} of {sig['of']} groups, bits per byte in"
        f" {sig['bits_per_byte']} (Holm-adjusted p < {sig['alpha']})"
    ]
    ranked = sorted(entry["groups"], key=lambda g: -abs(g["token_perplexity"]["delta"]) if math.isfinite(g["token_perplexity"]["delta"]) else 0)
    width = min(max(len(g["group"]) for g in ranked), 40)
    for g in ranked[:GROUPS_SHOWN]:
        m = g["token_perplexity"]
        mark = " *" if m["p_holm"] is not None and m["p_holm"] < sig["alpha"] else ""
        p_holm = f"  p (Holm) = {m['p_holm']:.4f}" if m["p_holm"] is not None else ""
        lines.append(f"    {g['group'][:40]:{width}}  {number(m['a'])} -> {number(m['b'])}  {signed(m['delta'])}" + interval(m) + p_holm + mark)
    if len(ranked) > GROUPS_SHOWN:
        lines.append(f"    and {len(ranked) - GROUPS_SHOWN:,} more groups (--json has every one)")
    return lines


def format_series_comparison(report: dict) -> str:
    lines = [f"series {report['series']}, {len(report['checkpoints'])} checkpoints; each against the one before (paired):"]
    width = max(len(c["name"]) for c in report["checkpoints"])
    for c in report["checkpoints"]:
        m = c["token_perplexity"]
        ci = f"  ({number(m['ci'][0])} - {number(m['ci'][1])})" if m["ci"] else ""
        step = f"step {c['step']:>8}" if c["step"] is not None else " " * 13
        line = f"  {c['name']:{width}}  {step}  token perplexity {number(m['value'])}{ci}"
        if "against_previous" in c:
            d = c["against_previous"]["token_perplexity"]
            line += f"  {signed(d['delta'])}" + interval(d)
        lines.append(line)
    return "\n".join(lines)


def series_markdown(report: dict) -> str:
    lines = ["| checkpoint | step | token perplexity | 95% CI | vs previous | 95% CI | p |", "|---|---|---|---|---|---|---|"]
    for c in report["checkpoints"]:
        m = c["token_perplexity"]
        ci = f"[{number(m['ci'][0])}, {number(m['ci'][1])}]" if m["ci"] else "n/a"
        d = c.get("against_previous", {}).get("token_perplexity")
        delta = signed(d["delta"]) if d else ""
        d_ci = f"[{signed(d['ci'][0])}, {signed(d['ci'][1])}]" if d and d["ci"] else ""
        p = f"{d['p_value']:.4f}" if d and d["p_value"] is not None else ""
        lines.append(f"| {c['name']} | {c['step'] if c['step'] is not None else ''} | {number(m['value'])} | {ci} | {delta} | {d_ci} | {p} |")
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    if "checkpoints" in report:
        return series_markdown(report)
    lines = ["| run | metric | baseline | run | difference | 95% CI | p |", "|---|---|---|---|---|---|---|"]
    for entry in report["runs"]:
        for metric in shown_metrics(entry):
            m = entry[metric]
            ci = f"[{signed(m['ci'][0])}, {signed(m['ci'][1])}]" if m["ci"] else "n/a"
            p = p_cell(m)
            lines.append(f"| {entry['run']} | {metric} | {number(m['a'])} | {number(m['b'])} | {signed(m['delta'])} | {ci} | {p} |")
        for name, m in entry.get("signals", {}).items():
            ci = f"[{m['ci'][0]:+.4g}, {m['ci'][1]:+.4g}]" if m["ci"] else "n/a"
            p = p_cell(m)
            lines.append(f"| {entry['run']} | {name} (mean) | {m['a']:.4g} | {m['b']:.4g} | {m['delta']:+.4g} | {ci} | {p} |")
        for point in entry.get("length_curve", []):
            for metric in ("token_perplexity", "mean_document_perplexity", "bits_per_byte"):
                m = point.get(metric)
                if m:
                    ci = f"[{signed(m['ci'][0])}, {signed(m['ci'][1])}]" if m["ci"] else "n/a"
                    p = p_cell(m)
                    lines.append(f"| {entry['run']} | {metric} at {point['length']:,} | {number(m['a'])} | {number(m['b'])} | {signed(m['delta'])} | {ci} | {p} |")
    if any("groups" in entry for entry in report["runs"]):
        lines += ["", "| run | group | documents | metric | baseline | run | difference | 95% CI | p | p (Holm) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for entry in report["runs"]:
            for g in entry.get("groups", []):
                for metric in GROUP_METRICS:
                    m = g[metric]
                    ci = f"[{signed(m['ci'][0])}, {signed(m['ci'][1])}]" if m["ci"] else "n/a"
                    p = p_cell(m)
                    holm_p = f"{m['p_holm']:.4f}" if m["p_holm"] is not None else "n/a"
                    lines.append(
                        f"| {entry['run']} | {g['group']} | {g['documents']:,} | {metric} | {number(m['a'])} | {number(m['b'])} | {signed(m['delta'])} | {ci} | {p} | {holm_p} |"
                    )
    return "\n".join(lines)


def shown_metrics(entry: dict) -> tuple[str, ...]:
    return METRICS + ((WORD_METRIC,) if WORD_METRIC in entry else ())


def interval(m: dict, spec: str | None = None) -> str:
    """'  95% CI [low, high]  p = 0.0123 (paired bootstrap, 1,234 documents)', or why there is none."""
    if m["ci"]:
        low, high = (format(x, spec) if spec else signed(x) for x in m["ci"])
        shown = f"  95% CI [{low}, {high}]"
    elif m.get("ci_missing"):
        shown = f"  95% CI n/a ({m['ci_missing']})"
    else:
        return ""
    return shown + (f"  p = {m['p_value']:.4f}" if m["p_value"] is not None else "  p n/a") + f" ({test_label(m)})"


def test_label(m: dict) -> str:
    """Which test gave the p-value, and over how many documents."""
    test = "exact" if m.get("test", "").startswith("exact") else "bootstrap"
    return f"{test}, {counted(m['documents'], 'document')}" if "documents" in m else test


def p_cell(m: dict) -> str:
    """A Markdown table's p cell: the value and its test."""
    return f"{m['p_value']:.4f} ({test_label(m)})" if m["p_value"] is not None else "n/a"


def number(value) -> str:
    if value is None or not math.isfinite(value):
        return "n/a" if value is None else str(value)
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"


def signed(value) -> str:
    return f"{value:+.4f}" if abs(value) < 1000 else f"{value:+,.1f}"
