"""`ppl-eval merge`: combine the result directories of `--shard I/N` runs into one report.

The merged summary is computed from all documents' rows, in index order, exactly as a single run
computes it (the bootstrap too), so it equals the unsharded run's; the data fingerprints of the
shards add up to the whole input's.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import Config, parse_shard
from ..data.documents import add_fingerprints
from ..engine.conventions import Windowing
from ..errors import EXIT_DATA, PplError
from ..output.run_directory import DOCUMENTS_FILE, ROW_STEMS, RUN_FILE, SUMMARY_FILE, Result, RunDirectory, ascending_runs, differing_key, merged_rows
from ..output.summary import build_summary
from ..output.token_export import copy_parts


def merge_runs(dirs: list[str], output: str, allow_partial: bool = False, overwrite: bool = False) -> Result:
    shards = [read_shard(Path(d)) for d in dirs]
    first = shards[0]
    for shard in shards[1:]:
        key = differing_key(first["identity"], shard["identity"], skip="shard")
        if key:
            raise PplError(
                f"{shard['dir']} and {first['dir']} come from different runs: {key} differs"
                f" ({shard['identity'].get(key)!r} vs {first['identity'].get(key)!r})",
                EXIT_DATA,
            )
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
    config = Config(**{**first["summary"]["config"], "shard": None, "output": output, "overwrite": overwrite})
    windowing = Windowing.from_description(first["summary"]["windowing"])
    data_info = {k: v for k, v in first["summary"]["data"].items() if k != "shard"}
    data_info["fingerprint"] = add_fingerprints(s["data"]["fingerprint"] for s in summaries)  # the shards' sums add up
    data_info["shards"] = {"count": count, "merged": sorted(by_index), "missing": missing, "complete": not missing}
    timings = {
        "wall_time_s": sum(s["wall_time_s"] for s in summaries),  # device time over all shards
        "scoring_time_s": sum(s["scoring_time_s"] for s in summaries),
        "scored_now": sum(s["tokens"] for s in summaries),
    }
    skipped = sum(s["skipped_documents"] for s in summaries)
    given = {}
    for stem in ROW_STEMS:
        files = [shard["dir"] / f"{stem}.jsonl" for shard in shards if (shard["dir"] / f"{stem}.jsonl").exists()]
        if files:
            given[stem] = merged_rows({path: ascending_runs(path) for path in files})
    reference_info = first["summary"].get("reference", {}).get("model")

    def summarize(rows, reference=(), contexts=()):
        model = first["summary"]["model"]
        summary = build_summary(config, rows, skipped, model, data_info, windowing, timings, reference_info, reference, contexts)
        if summary["documents"] == 0 and not missing:
            raise PplError(f"nothing to score: the {skipped:,} documents of every shard are all empty or whitespace only", EXIT_DATA)
        return summary

    with RunDirectory(output, overwrite) as run_dir:
        run_dir.begin({**first["identity"], "shard": None})
        copy_parts([shard["dir"] for shard in shards], run_dir.path)
        summary = run_dir.finish(summarize, given)
    return Result(summary, run_dir.documents)


def read_shard(path: Path) -> dict:
    for name in (RUN_FILE, SUMMARY_FILE, DOCUMENTS_FILE):
        if not (path / name).is_file():
            raise PplError(f"{path} is not a finished ppl-eval run: no {name}", EXIT_DATA)
    try:
        identity = json.loads((path / RUN_FILE).read_text(encoding="utf-8"))
        summary = json.loads((path / SUMMARY_FILE).read_text(encoding="utf-8"))
    except ValueError:
        raise PplError(f"{path}: {RUN_FILE} or {SUMMARY_FILE} is not valid JSON", EXIT_DATA) from None
    if not identity.get("shard"):
        raise PplError(f"{path} is not a shard (it was run without --shard)", EXIT_DATA)
    index, count = parse_shard(identity["shard"])
    return {
        "dir": path,
        "identity": identity,
        "summary": summary,
        "index": index,
        "count": count,
    }
