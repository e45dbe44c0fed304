"""`ppl-eval merge`: combine result directories into one report: the shards of one run, or whole runs over different data.

Shards (`--shard I/N`): the merged summary is computed from all documents' rows, in index order,
exactly as a single run computes it (the bootstrap too), so it equals the unsharded run's; the
data fingerprints of the shards add up to the whole input's.

Runs over different data (one run a file, say, with --group-by file): their documents are put
one after the other, in the order given, each run's indices offset by the documents of the runs
before it; every row keeps its id and its group. The merged summary is what one run over all
their inputs in that order computes, but for the data fingerprint, which names the runs' own.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from ..config import Config, parse_shard
from ..data.documents import add_fingerprints
from ..data.records import BadRecords
from ..engine.conventions import Windowing
from ..errors import EXIT_DATA, PplError
from ..output.run_directory import (
    DOCUMENTS_FILE,
    ROW_STEMS,
    RUN_FILE,
    SUMMARY_FILE,
    Result,
    RunDirectory,
    ascending_runs,
    csv_columns,
    differing_key,
    merged_rows,
    read_rows,
)
from ..output.summary import Unscored, build_summary, nothing_scored
from ..output.token_export import TOKENS_DIR, copy_parts
from ..output.word_export import WORDS_DIR

DATA_KEYS = ("data", "data_files", "shard")  # what may differ between runs over different data
PARTS_PREFIX = "parts-sha256:"  # the fingerprint of runs put one after the other


def merge_runs(dirs: list[str], output: str, allow_partial: bool = False, overwrite: bool = False) -> Result:
    runs = [read_result(Path(d)) for d in dirs]
    refuse_twice(runs)
    sharded = [run for run in runs if run["shard"]]
    if sharded and len(sharded) < len(runs):
        whole = next(run for run in runs if not run["shard"])
        raise PplError(f"{whole['dir']} is a whole run and {sharded[0]['dir']} a shard; merge the shards of each run first", EXIT_DATA)
    if sharded:
        return merge_shards(runs, output, allow_partial, overwrite)
    return concatenate(runs, output, overwrite)


def refuse_twice(runs: list[dict]) -> None:
    """No document may be merged twice: not a folder given twice, nor (whole runs) two runs over the
    same input (the same data fingerprint, of the run or of a run merged into it, or the same files
    read the same way, --limit aside), nor (shards) the same shard twice."""
    seen: dict[tuple, Path] = {}
    for run in runs:
        keys = [("folder", str(run["dir"].resolve()))]
        if not run["shard"]:
            data = run["summary"]["data"]
            keys += [("fingerprint", part["fingerprint"]) for part in data.get("parts", [data])]
            identity = run["identity"]
            options = {k: v for k, v in identity["data_options"].items() if k != "limit"}
            keys.append(("input", json.dumps([identity["data"], identity["data_files"], options], sort_keys=True)))
        for key in keys:
            if key in seen:
                why = {"folder": "the same folder", "fingerprint": f"the same documents (data fingerprint {key[1][:27]}...)",
                       "input": f"the same documents (the same input, {', '.join(run['identity']['data'])})"}[key[0]]  # fmt: skip
                raise PplError(f"{seen[key]} and {run['dir']} hold {why}: merging them would count every document twice", EXIT_DATA)
            seen[key] = run["dir"]


def merge_shards(shards: list[dict], output: str, allow_partial: bool, overwrite: bool) -> Result:
    first = shards[0]
    for shard in shards[1:]:
        check_same_run(first, shard, skip=("shard",))
    counts = {shard["count"] for shard in shards}
    if len(counts) > 1:
        raise PplError(f"the shards split the data differently: into {sorted(counts)} parts", EXIT_DATA)
    count = counts.pop()
    by_index: dict[int, Path] = {}
    for shard in shards:
        if shard["index"] in by_index:
            raise PplError(f"shard {shard['index']}/{count} is given twice: {by_index[shard['index']]} and {shard['dir']}", EXIT_DATA)
        by_index[shard["index"]] = shard["dir"]
    missing = [i for i in range(count) if i not in by_index]
    if missing and not allow_partial:
        names = ", ".join(f"{i}/{count}" for i in missing)
        raise PplError(f"missing shard{'s' if len(missing) > 1 else ''} {names}; use --allow-partial to merge anyway", EXIT_DATA)

    summaries = [shard["summary"] for shard in shards]
    data_info = {k: v for k, v in first["summary"]["data"].items() if k != "shard"}
    data_info["fingerprint"] = add_fingerprints(s["data"]["fingerprint"] for s in summaries)  # the shards' sums add up
    data_info["shards"] = {"count": count, "merged": sorted(by_index), "missing": missing, "complete": not missing}
    given = {}
    for stem in ROW_STEMS:
        files = [shard["dir"] / f"{stem}.jsonl" for shard in shards if (shard["dir"] / f"{stem}.jsonl").exists()]
        if files:
            given[stem] = merged_rows({path: ascending_runs(path) for path in files})
    identity = {**first["identity"], "shard": None}
    config = first_config(first, output, overwrite)
    return write_merged(shards, config, identity, data_info, given, output, overwrite, offsets=None, complete=not missing)


def concatenate(runs: list[dict], output: str, overwrite: bool) -> Result:
    """Runs over different data, one after the other: indices offset, rows, lines and tokens kept."""
    first = runs[0]
    for run in runs[1:]:
        check_same_run(first, run, skip=DATA_KEYS)
    for run in runs:
        if "sampling" in run["summary"]["data"]:
            raise PplError(f"{run['dir']} is a sampled run (an estimate); merge runs that scored every document", EXIT_DATA)
    offsets, total = [], 0
    for run in runs:
        offsets.append(total)
        total += run["summary"]["data"]["documents"]
    summaries = [run["summary"] for run in runs]
    data_info = {
        "source": ", ".join(s["data"]["source"] for s in summaries),
        "files": sum(s["data"]["files"] for s in summaries),
        "bytes": sum(s["data"]["bytes"] or 0 for s in summaries) if all(s["data"]["bytes"] is not None for s in summaries) else None,
        "documents": total,
        "fingerprint": PARTS_PREFIX + hashlib.sha256(json.dumps([s["data"]["fingerprint"] for s in summaries]).encode()).hexdigest(),
        "parts": [
            {"run": str(run["dir"]), "source": run["summary"]["data"]["source"], "first_index": offset,
             "documents": run["summary"]["data"]["documents"], "fingerprint": run["summary"]["data"]["fingerprint"]}
            for run, offset in zip(runs, offsets)
        ],  # fmt: skip
    }
    given = {}
    for stem in ROW_STEMS:
        present = [(run["dir"] / f"{stem}.jsonl", offset) for run, offset in zip(runs, offsets) if (run["dir"] / f"{stem}.jsonl").exists()]
        if present:
            given[stem] = shifted(present)
    data = [spec for run in runs for spec in run["identity"]["data"]]
    identity = {**first["identity"], "data": data, "data_files": f"the data of {len(runs)} runs, fingerprint {data_info['fingerprint']}"}
    config = first_config(first, output, overwrite).replace(data=tuple(data))
    return write_merged(runs, config, identity, data_info, given, output, overwrite, offsets=offsets, complete=True)


def shifted(files: list[tuple[Path, int]]) -> Iterator[dict]:
    """The lines of each file in turn, their index moved up by its run's offset."""
    for path, offset in files:
        for line in read_rows(path):
            yield {**line, "index": line["index"] + offset}


def first_config(first: dict, output: str, overwrite: bool) -> Config:
    return Config(**{**first["summary"]["config"], "shard": None, "output": output, "overwrite": overwrite})


def write_merged(runs, config, identity, data_info, given, output, overwrite, offsets, complete: bool) -> Result:
    """The merged directory: rows and the files beside them, tokens, documents.csv and the summary."""
    summaries = [run["summary"] for run in runs]
    first = summaries[0]
    windowing = Windowing.from_description(first["windowing"])
    timings = {
        "wall_time_s": sum(s["wall_time_s"] for s in summaries),  # device time over all runs
        "scoring_time_s": sum(s["scoring_time_s"] for s in summaries),
        "scored_now": sum(s["tokens"] for s in summaries),
    }
    skipped = skipped_by_group(summaries)
    bad = [s["bad_records"] for s in summaries if "bad_records" in s]
    curves = [s.get("length_curve") or {} for s in summaries]
    unscored = Unscored(sum(c.get("too_short_documents", 0) for c in curves), BadRecords.joined(bad) if bad else None, max(c.get("longest_too_short", 0) for c in curves))
    reference_info = first.get("reference", {}).get("model")

    def summarize(rows, reference=(), contexts=()):
        summary = build_summary(config, rows, skipped, first["model"], data_info, windowing, timings, reference_info, reference, contexts, unscored)
        if summary["documents"] == 0 and complete:
            sources = f"the {len(runs)} runs" if len(runs) > 1 else str(runs[0]["dir"])
            raise PplError(nothing_scored(sources, sum(skipped.values()), unscored.short, unscored.longest_short, windowing.lengths, windowing.needed_tokens), EXIT_DATA)
        return {**summary, **({"bow_correction": first["bow_correction"]} if "bow_correction" in first else {})}

    with RunDirectory(output, overwrite) as run_dir:
        run_dir.begin(identity)
        for folder in (TOKENS_DIR, WORDS_DIR):
            copy_parts([run["dir"] for run in runs], run_dir.path, offsets, folder)
        summary = run_dir.finish(summarize, given, csv_columns(config.group_by is not None, config.signals, config.reference_model is not None))
    return Result(summary, run_dir.documents)


def check_same_run(first: dict, other: dict, skip: tuple[str, ...]) -> None:
    """Everything that decides the numbers but the data itself (and the shard) must agree."""
    a, b = ({k: v for k, v in run["identity"].items() if k not in skip} for run in (first, other))
    key = differing_key(a, b)
    if key:
        raise PplError(
            f"{other['dir']} and {first['dir']} come from different runs: {key} differs ({b.get(key)!r} vs {a.get(key)!r})",
            EXIT_DATA,
        )


def skipped_by_group(summaries: list[dict]) -> Counter:
    """The runs' skipped documents, by group (None when the runs were not grouped)."""
    out: Counter = Counter()
    for s in summaries:
        if "groups" in s:
            out.update({name: group["skipped_documents"] for name, group in s["groups"].items()})
            out[None] += s["skipped_documents"] - sum(group["skipped_documents"] for group in s["groups"].values())
        else:
            out[None] += s["skipped_documents"]
    return out


def read_result(path: Path) -> dict:
    """A finished run's identity and summary, and its shard (None for a whole run)."""
    for name in (RUN_FILE, SUMMARY_FILE, DOCUMENTS_FILE):
        if not (path / name).is_file():
            raise PplError(f"{path} is not a finished ppl-eval run: no {name}", EXIT_DATA)
    try:
        identity = json.loads((path / RUN_FILE).read_text(encoding="utf-8"))
        summary = json.loads((path / SUMMARY_FILE).read_text(encoding="utf-8"))
    except ValueError:
        raise PplError(f"{path}: {RUN_FILE} or {SUMMARY_FILE} is not valid JSON", EXIT_DATA) from None
    index, count = parse_shard(identity["shard"]) if identity.get("shard") else (None, None)
    return {"dir": path, "identity": identity, "summary": summary, "shard": identity.get("shard"), "index": index, "count": count}
