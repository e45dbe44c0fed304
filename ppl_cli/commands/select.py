"""`ppl-eval select`: keep the records of a scored corpus by their perplexity, as corpus curation does.

The run's per-document scores decide (a few numbers a document are held: index, value, tokens,
bytes); the records themselves are read again from the run's own data source, streamed, and
written with their scores under `ppl_eval` as they pass. Every output is written to a temp file
and renamed at the end, after the source has proved to be the data the run scored.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import BANDS, SIGNAL_METRICS, Config, as_tuple, check_types, parse_shard
from ..config import SELECT_FORMATS as FORMATS
from ..config import SELECT_METRICS as METRICS
from ..data.documents import DocumentStream, digest, fingerprint, whole_record
from ..data.sources import resolve_sources
from ..errors import EXIT_DATA, EXIT_OUTPUT, PplError
from ..output.locking import LOCK_NAME, OutputLock
from ..output.run_directory import DOCUMENTS_FILE, RUN_FILE, SUMMARY_FILE, read_rows, write_atomic, writing

PREFIX = "ppl_eval"  # each written record gains {"ppl_eval": {"index": ..., "token_perplexity": ..., ...}}
SCORE_FIELDS = ("index", "id", "token_perplexity", "bits_per_byte", "word_perplexity", "byte_perplexity", "nll_sum", "tokens")
METRIC_SOURCES = {  # how to get a metric that not every run has
    "ifd": "a run with --ifd has it",
    "word_perplexity_corrected": "a run with --save-words has it",
    **{name: "a run with --signals has it" for name in SIGNAL_METRICS},
    "reference_ratio": "a run with --signals and --reference-model has it",
}
OPTIONAL_SCORE_FIELDS = ("ifd", "unconditional_nll_sum", "context_tokens", "turns", "word_perplexity_corrected", *SIGNAL_METRICS)  # a conditional, --save-words or --signals run's, when its rows have them
PARQUET_BATCH = 1000


@dataclass(frozen=True)
class SelectConfig:
    run: str  # a result directory of run or merge
    output: str | None = None  # a file, a folder (--buckets), or - for JSON Lines on stdout; None: report only
    metric: str = "token_perplexity"
    min: float | None = None  # bounds on the metric, inclusive
    max: float | None = None
    min_perplexity: float | None = None  # bounds on token_perplexity, inclusive
    max_perplexity: float | None = None
    keep: str | None = None  # low, middle or high: a band by rank
    keep_fraction: float | None = None
    buckets: tuple[float, ...] | None = None  # percentiles cutting the documents into len + 1 buckets
    format: str | None = None  # the buckets' files: jsonl, jsonl.gz, jsonl.zst or parquet
    data: tuple[str, ...] | None = None  # read the records from here instead of the run's source
    group_by: str | None = None  # cut points and bands within each group (a field, file or dir), as CCNet does per language
    allow_partial: bool = False
    overwrite: bool = False

    def __post_init__(self):
        if isinstance(self.buckets, str):  # "30,60" as the CLI and YAML give it
            try:
                object.__setattr__(self, "buckets", tuple(float(x) for x in self.buckets.split(",")))
            except ValueError:
                raise PplError(f"--buckets must be percentiles separated by commas, such as 30,60, not {self.buckets!r}") from None
        object.__setattr__(self, "buckets", as_tuple(self.buckets))
        object.__setattr__(self, "data", as_tuple(self.data))
        check_types(self)
        if self.metric not in METRICS:
            raise PplError(f"metric must be one of {', '.join(METRICS)}, not {self.metric!r}")
        thresholds = any(v is not None for v in (self.min, self.max, self.min_perplexity, self.max_perplexity))
        if not (thresholds or self.keep or self.buckets) or (self.buckets and (thresholds or self.keep)):
            kinds = [name for name, given in (("thresholds", thresholds), ("--keep", self.keep), ("--buckets", self.buckets)) if given]
            raise PplError(
                "choose a criterion: thresholds (--min/--max, --min-perplexity/--max-perplexity), --keep with"
                " --keep-fraction (after thresholds, if any), or --buckets alone" + (f"; given: {' and '.join(kinds)}" if kinds else "")
            )
        if self.keep is not None:
            if self.keep not in BANDS:
                raise PplError(f"--keep must be one of {', '.join(BANDS)}, not {self.keep!r}")
            if self.keep_fraction is None or not 0 < self.keep_fraction <= 1:
                raise PplError(f"--keep-fraction must be in (0, 1], not {self.keep_fraction}")
        elif self.keep_fraction is not None:
            raise PplError("--keep-fraction goes with --keep low|middle|high")
        if self.buckets is not None:
            cuts = self.buckets
            if not cuts or any(not 0 < c < 100 for c in cuts) or any(b <= a for a, b in zip(cuts, cuts[1:])):
                raise PplError(f"--buckets must be increasing percentiles between 0 and 100, not {','.join(map(str, cuts))}")
            if self.output not in (None, "-") and Path(self.output).suffix:
                raise PplError("--buckets writes one file per bucket: -o must name a folder")
            if self.format is not None and f".{self.format}" not in FORMATS:
                raise PplError(f"--format must be one of {', '.join(f[1:] for f in FORMATS)}, not {self.format!r}")
        elif self.output not in (None, "-") and output_format(self.output) is None:
            raise PplError(f"-o {self.output}: the output must end in {', '.join(FORMATS)}, or be - for stdout")


def output_format(name: str) -> str | None:
    return next((f for f in FORMATS if name.lower().endswith(f)), None)


def bucket_names(count: int) -> list[str]:
    """CCNet's names for two cut points; bucket-K otherwise (0 = the lowest values)."""
    return ["head", "middle", "tail"] if count == 3 else [f"bucket-{k}" for k in range(count)]


def select_records(config: SelectConfig) -> dict:
    run = Path(config.run)
    identity, summary = read_run(run)
    if summary and summary["windowing"]["convention"] in ("hf-recipe", "llama-cpp"):
        raise PplError(f"{run} scored the corpus as one joined document ({summary['windowing']['convention']}); select needs a score a document")
    if summary and "parts" in summary["data"]:
        raise PplError(f"{run} is a merge of runs over different data; select from each of those runs", EXIT_DATA)
    if summary and "sampling" in summary["data"]:
        raise PplError(f"{run} scored a sample of its data (an estimate); select needs a run that scored every document", EXIT_DATA)
    partial = partial_reason(identity, summary)
    if partial and not config.allow_partial:
        raise PplError(f"{run} {partial}; --allow-partial selects among the documents it scored", EXIT_DATA)
    scores = Scores.read(run, config)
    if config.group_by:
        scores.group = document_groups(run, identity, scores, config)
    chosen, cuts = decide(scores, config)
    outputs = planned_outputs(config)
    try:
        if outputs:
            source_config = Config(data=config.data or tuple(identity["data"]), **identity["data_options"])
            written = write_records(source_config, run, scores, chosen, outputs, config, covered(identity, summary), summary)
        else:  # only the decision: the source need not be read (or be there)
            written = {"read": None, "written": [], "skipped": summary["skipped_documents"] if summary else None, "not_scored": None}
        selection = describe(config, scores, chosen, cuts, written, summary, partial)
        if outputs.get("summary_path"):
            write_atomic(outputs["summary_path"], json.dumps(selection, indent=2, ensure_ascii=False) + "\n")
    finally:
        if outputs.get("lock"):
            outputs["lock"].release()
    return selection


def read_run(run: Path) -> tuple[dict, dict | None]:
    """run.json (what it is, how its data reads) and summary.json (None while it is still going)."""
    for name in (RUN_FILE, DOCUMENTS_FILE):
        if not (run / name).is_file():
            raise PplError(f"{run} is not a ppl-eval result directory: no {name}", EXIT_DATA)
    try:
        identity = json.loads((run / RUN_FILE).read_text(encoding="utf-8"))
        summary = json.loads((run / SUMMARY_FILE).read_text(encoding="utf-8")) if (run / SUMMARY_FILE).is_file() else None
    except ValueError:
        raise PplError(f"{run}: {RUN_FILE} or {SUMMARY_FILE} is not valid JSON", EXIT_DATA) from None
    if "data_options" not in identity:
        raise PplError(f"{run} was made by an older ppl-eval, whose run.json does not say how to read its data again", EXIT_DATA)
    return identity, summary


def partial_reason(identity: dict, summary: dict | None) -> str | None:
    if summary is None:
        return "is not finished (no summary.json: still going, or stopped)"
    shards = summary["data"].get("shards")
    if shards and not shards["complete"]:
        missing = ", ".join(f"{i}/{shards['count']}" for i in shards["missing"])
        return f"is a partial merge: shards {missing} are missing"
    if identity.get("shard") and parse_shard(identity["shard"])[1] > 1 and not shards:
        return f"is one shard ({identity['shard']}) of a corpus; merge the shards first"
    return None


def covered(identity: dict, summary: dict | None):
    """Which documents the run's data fingerprint sums over: its shards' (None: no fingerprint yet)."""
    if summary is None:
        return None
    shards = summary["data"].get("shards")
    if shards:
        merged, count = set(shards["merged"]), shards["count"]
        return lambda d: d % count in merged
    if identity.get("shard"):
        index, count = parse_shard(identity["shard"])
        return lambda d: d % count == index
    return lambda d: True


class Scores:
    """The scored documents' index, metric value, tokens and bytes, from documents.jsonl (in index order)."""

    def __init__(self, index, value, tokens, n_bytes, token_ppl, unscored: int, groups: list | None = None):
        self.index, self.value, self.tokens, self.bytes, self.token_ppl = index, value, tokens, n_bytes, token_ppl
        self.unscored = unscored  # rows whose metric is null (no words, say)
        self.row_groups = groups  # the rows' `group`, when the run was grouped
        self.group: np.ndarray | None = None  # --group-by: each document's group (names, as an object array)

    @classmethod
    def read(cls, run: Path, config: SelectConfig) -> Scores:
        index, value, tokens, n_bytes, token_ppl, groups = [], [], [], [], [], []
        unscored = 0
        for row in read_rows(run / DOCUMENTS_FILE):
            groups.append(row.get("group"))
            if config.metric not in row:
                raise PplError(f"{run} has no {config.metric} for its documents; {METRIC_SOURCES.get(config.metric, 'choose another --metric')}", EXIT_DATA)
            if row[config.metric] is None:
                unscored += 1
                groups.pop()
                continue
            index.append(row["index"])
            value.append(row[config.metric])
            tokens.append(row["tokens"])
            n_bytes.append(row["bytes"])
            token_ppl.append(row["token_perplexity"] if row["token_perplexity"] is not None else math.nan)
        as_array = lambda x, t: np.array(x, dtype=t)  # noqa: E731
        return cls(as_array(index, np.int64), as_array(value, np.float64), as_array(tokens, np.int64), as_array(n_bytes, np.int64),
                   as_array(token_ppl, np.float64), unscored, groups)  # fmt: skip


def document_groups(run: Path, identity: dict, scores: Scores, config: SelectConfig) -> np.ndarray:
    """Each scored document's group: from the rows when the run was grouped by the same key, else
    read from the run's source (a pass over it that parses only what the key needs)."""
    if identity["data_options"].get("group_by") == config.group_by:
        return np.array(scores.row_groups, dtype=object)
    options = {**identity["data_options"], "group_by": config.group_by}
    source_config = Config(data=config.data or tuple(identity["data"]), **options)
    position = {int(i): k for k, i in enumerate(scores.index)}
    out = np.empty(len(scores.index), dtype=object)
    for index, doc in DocumentStream(resolve_sources(source_config), source_config, mine=position.__contains__):
        out[position[index]] = doc.group
    if any(g is None for g in out):
        raise PplError(f"the data read is not the data {run} scored: some scored documents were not found in it", EXIT_DATA)
    return out


def decide(scores: Scores, config: SelectConfig) -> tuple[np.ndarray, dict]:
    """For each scored document (in scores' order), its output (0.., or -1: not kept), and the cut
    points; with --group-by, decided within each group on its own, and the cut points of every group."""
    if scores.group is None:
        return decide_among(scores, np.arange(len(scores.value)), config)
    chosen = np.full(len(scores.value), -1, dtype=np.int64)
    by_group = {}
    for name in sorted(set(scores.group)):
        at = np.flatnonzero(scores.group == name)
        chosen[at], cuts = decide_among(scores, at, config)
        by_group[name] = {"scored_documents": len(at), **cuts}
    return chosen, {"group_by": config.group_by, "groups": by_group}


def decide_among(scores: Scores, at: np.ndarray, config: SelectConfig) -> tuple[np.ndarray, dict]:
    """The decision for the documents at positions `at` of scores (all, or one group's).

    Thresholds keep the documents within every bound given. Ranks order the values ascending, ties
    by index. --keep takes k = floor(F n + 1/2) of the n documents within the thresholds (all
    scored documents without thresholds): ranks [0, k) (low), [n - k, n) (high), or
    [floor((n - k) / 2), that + k) (middle). --buckets: the cut points are numpy's
    linear-interpolation percentiles of the values, and a document goes to the number of cut
    points below its value (a value equal to a cut point stays below it).
    """
    value, index, token_ppl = scores.value[at], scores.index[at], scores.token_ppl[at]
    n = len(value)
    chosen = np.full(n, -1, dtype=np.int64)
    if config.buckets is not None:
        cuts = [float(c) for c in np.percentile(value, config.buckets)] if n else []
        chosen[:] = np.searchsorted(np.array(cuts), value, side="left") if n else chosen
        return chosen, {"percentiles": list(config.buckets), "values": cuts}
    passing = np.ones(n, dtype=bool)
    with np.errstate(invalid="ignore"):
        for bound, values, test in (
            (config.min, value, np.greater_equal),
            (config.max, value, np.less_equal),
            (config.min_perplexity, token_ppl, np.greater_equal),
            (config.max_perplexity, token_ppl, np.less_equal),
        ):
            if bound is not None:
                passing &= test(values, bound)
    if config.keep is None:
        chosen[passing] = 0
        return chosen, {}
    candidates = np.flatnonzero(passing)
    m = len(candidates)
    k = math.floor(config.keep_fraction * m + 0.5)
    order = candidates[np.lexsort((index[candidates], value[candidates]))]  # by value, then index
    start = {"low": 0, "high": m - k, "middle": (m - k) // 2}[config.keep]
    kept = order[start : start + k]
    chosen[kept] = 0
    edges = [float(value[kept].min()), float(value[kept].max())] if k else []
    return chosen, {"band": config.keep, "fraction": config.keep_fraction, "documents": k, "of": m, "values": edges}


def planned_outputs(config: SelectConfig) -> dict:
    """Where the records and selection.json go; an existing output is refused unless --overwrite."""
    if config.output is None:
        return {}
    if config.output == "-":
        return {"files": ["-"], "format": ".jsonl"}
    target = Path(config.output)
    if config.buckets is not None:
        fmt = f".{config.format}" if config.format else ".jsonl"
        names = bucket_names(len(config.buckets) + 1)
        files = [target / f"{name}{fmt}" for name in names]
        summary_path = target / "selection.json"
    else:
        fmt = output_format(config.output)
        files = [target]
        summary_path = target.with_name(target.name + ".selection.json")
    folder = target if config.buckets is not None else target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PplError(f"cannot create {folder}: {e.strerror}", EXIT_OUTPUT) from None
    # select's outputs are files for people to use: its lock file goes when it is done
    lock_file = folder / LOCK_NAME if config.buckets is not None else folder / f".{target.name}.lock"
    lock = OutputLock(lock_file, str(target), remove=True)
    lock.acquire()
    existing = [p for p in [*files, summary_path] if p.exists()]
    if existing and not config.overwrite:
        lock.release()
        raise PplError(f"{existing[0]} exists; use --overwrite to replace it", EXIT_OUTPUT)
    return {"files": files, "format": fmt, "summary_path": summary_path, "lock": lock}


def write_records(source_config, run, scores, chosen, outputs, config, fingerprint_covers, summary) -> dict:
    """Stream the source; write each chosen record with its scores; check the source is the run's data."""
    by_index = dict(zip(scores.index.tolist(), chosen.tolist()))
    writers = [RecordWriter(f, outputs["format"]) for f in outputs.get("files", [])]
    rows = read_rows(run / DOCUMENTS_FILE)
    row = next(rows, None)
    counts = {"read": 0, "written": [0] * len(writers), "skipped": 0, "not_scored": 0}
    digest_sum = 0
    stream = DocumentStream(resolve_sources(source_config), source_config, all_columns=True)
    try:
        for index, record, doc in stream.with_records():
            counts["read"] += 1
            if fingerprint_covers is not None and fingerprint_covers(index):
                digest_sum += digest(index, doc)
            while row is not None and row["index"] < index:
                row = next(rows, None)
            if row is None or row["index"] != index:
                # The run's own shares: a document without a row was skipped; elsewhere it was not scored.
                skipped = fingerprint_covers(index) if fingerprint_covers is not None else doc.empty
                counts["skipped" if skipped else "not_scored"] += 1
                continue
            if row["id"] != doc.id:
                raise PplError(
                    f"the data read is not the data {run} scored: document {index} has id {doc.id!r} here and {row['id']!r}"
                    " in documents.jsonl",
                    EXIT_DATA,
                )
            out = by_index.get(index, -1)
            if out >= 0 and writers:
                scores_kept = {k: row[k] for k in SCORE_FIELDS} | {k: row[k] for k in OPTIONAL_SCORE_FIELDS if k in row}
                writers[out].write({**whole_record(record, doc), PREFIX: scores_kept})
                counts["written"][out] += 1
        if summary is not None and fingerprint(digest_sum) != summary["data"]["fingerprint"]:
            raise PplError(
                f"the data read is not the data {run} scored (its fingerprint differs); give the run's own data with --data",
                EXIT_DATA,
            )
        for writer in writers:
            writer.commit()
    finally:
        for writer in writers:
            writer.abort()
    return counts


class RecordWriter:
    """Records to JSON Lines (plain, .gz, .zst) or Parquet, in a temp file renamed by commit()."""

    def __init__(self, path, fmt: str):
        self.path, self.fmt = path, fmt
        self.rows: list[dict] = []
        self.parquet = None
        if path == "-":
            self.tmp, self.file = None, sys.stdout
            return
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with writing(path):
            self.raw = raw = open(self.tmp, "wb")  # closed by commit() or abort(), whatever wraps it
        if fmt == ".parquet":
            self.file = None
            return
        if fmt == ".jsonl.gz":
            import gzip

            raw = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0)
        elif fmt == ".jsonl.zst":
            try:
                from compression import zstd
            except ImportError:
                from backports import zstd
            raw = zstd.ZstdFile(raw, mode="wb")
        import io

        self.file = io.TextIOWrapper(raw, encoding="utf-8", newline="\n")

    def write(self, record: dict) -> None:
        if self.tmp is None:  # stdout: a reader that goes away ends select as it ends run
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
            return
        with writing(self.path):
            if self.fmt != ".parquet":
                self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
                return
            self.rows.append(record)
            if len(self.rows) == PARQUET_BATCH:
                self.flush_parquet()

    def flush_parquet(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.parquet is None:
            table = pa.Table.from_pylist(self.rows)
            self.parquet = pq.ParquetWriter(self.raw, table.schema, compression="zstd")
        else:
            try:
                table = pa.Table.from_pylist(self.rows, schema=self.parquet.schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as e:
                raise PplError(f"the records differ in their fields or types ({str(e).splitlines()[0]}); write .jsonl instead", EXIT_DATA) from None
        self.parquet.write_table(table)
        self.rows = []

    def commit(self) -> None:
        if self.tmp is None:
            self.file.flush()
            return
        with writing(self.path):
            self.finish_file()
        self.tmp = None

    def finish_file(self) -> None:
        """Write what is left, close the temp file and rename it over the output."""
        if self.fmt == ".parquet":
            if self.rows or self.parquet is None:
                if self.parquet is None and not self.rows:
                    import pyarrow as pa
                    import pyarrow.parquet as pq

                    pq.write_table(pa.table({}), self.raw)
                else:
                    self.flush_parquet()
            if self.parquet is not None:
                self.parquet.close()
        else:
            self.file.close()
        self.raw.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Remove the temp file of an output that was not committed."""
        if self.tmp is not None:
            for opened in (self.file, self.parquet, self.raw):
                if opened is not None:
                    with contextlib.suppress(OSError):  # after a failed write, closing cannot flush either
                        opened.close()
            Path(self.tmp).unlink(missing_ok=True)
            self.tmp = None


def describe(config: SelectConfig, scores: Scores, chosen: np.ndarray, cuts: dict, written: dict, summary, partial) -> dict:
    """What selection.json records: the criteria, cut points, counts, shares kept and the source."""
    outputs = len(written["written"]) if written["written"] else (len(config.buckets) + 1 if config.buckets else 1)
    names = bucket_names(outputs) if config.buckets else ["kept"]
    total_tokens, total_bytes = int(scores.tokens.sum()), int(scores.bytes.sum())
    groups = []
    for k, name in enumerate(names):
        mask = chosen == k
        groups.append({
            "name": name,
            "file": str(planned_file(config, name)) if config.output else None,
            "documents": int(mask.sum()),
            "token_share": float(scores.tokens[mask].sum() / total_tokens) if total_tokens else None,
            "byte_share": float(scores.bytes[mask].sum() / total_bytes) if total_bytes else None,
        })  # fmt: skip
    criteria = {k: getattr(config, k) for k in ("metric", "min", "max", "min_perplexity", "max_perplexity", "keep", "keep_fraction")}
    criteria["buckets"] = list(config.buckets) if config.buckets else None
    criteria["group_by"] = config.group_by
    return {
        "run": config.run,
        "criteria": criteria,
        "cut_points": cuts,
        "scored_documents": len(scores.value),
        "documents_without_the_metric": scores.unscored,
        "skipped_documents": written["skipped"],
        "not_scored_documents": written["not_scored"],
        "documents_read": written["read"],
        "selected": groups,
        "source": {"data": list(config.data) if config.data else None, "fingerprint": summary["data"]["fingerprint"] if summary else None},
        "partial": partial,
    }


def planned_file(config: SelectConfig, name: str) -> str:
    if config.output == "-":
        return "-"
    if config.buckets is not None:
        return str(Path(config.output) / f"{name}.{config.format or 'jsonl'}")
    return config.output


def format_selection(selection: dict) -> str:
    """A few lines for a person."""
    c = selection["criteria"]
    lines = [f"{selection['scored_documents']:,} scored documents of {selection['run']}, by {c['metric']}"]
    cuts = selection["cut_points"]
    for name, group_cuts in cuts["groups"].items() if "groups" in cuts else [(None, cuts)]:
        where = f"{name} ({group_cuts['scored_documents']:,} documents): " if name is not None else ""
        if group_cuts.get("percentiles"):
            lines.append(f"{where}cut points " + ", ".join(f"p{p:g} = {v:.6g}" for p, v in zip(group_cuts["percentiles"], group_cuts["values"])))
        if group_cuts.get("band"):
            values = " to ".join(f"{v:.6g}" for v in group_cuts["values"])
            lines.append(f"{where}{group_cuts['band']} {group_cuts['fraction']:g}: {group_cuts['documents']:,} documents, values {values}")
    for g in selection["selected"]:
        share = f", {g['token_share']:.1%} of tokens, {g['byte_share']:.1%} of bytes" if g["token_share"] is not None else ""
        lines.append(f"{g['name']}: {g['documents']:,} documents{share}" + (f" -> {g['file']}" if g["file"] else ""))
    for key, label in (("skipped_documents", "skipped by the run (empty)"), ("not_scored_documents", "not scored (a partial run)"),
                       ("documents_without_the_metric", f"without a {c['metric']}")):  # fmt: skip
        if selection[key]:  # 0 or None (not known without reading the source)
            lines.append(f"{selection[key]:,} documents {label}: not selected")
    return "\n".join(lines)
