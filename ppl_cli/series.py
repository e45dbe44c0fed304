"""A series of models (a training run's checkpoints, a hub repository's revisions): each scored in turn into OUTPUT/<name>/.

`--model` given several times (in that order), a quoted glob of checkpoint folders (in the order
of the step number in their names), or `--revisions A,B,...` of one model (in that order). Every
checkpoint's directory is a normal, resumable run directory; one already finished with the same
configuration is not scored again. OUTPUT/series.json lists the checkpoints with their step and
their corpus numbers, rewritten after each one. The tokenizer is loaded once when the checkpoints
share it (the same tokenizer files); checkpoints whose tokenizers differ are refused.
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .config import GLOB, Config
from .errors import EXIT_MODEL, EXIT_OUTPUT, PplError
from .output.locking import OutputLock
from .output.run_directory import SERIES_FILE, SUMMARY_FILE, Result, write_atomic

LOCK_NAME = ".ppl-eval-series.lock"  # the series' own lock; each checkpoint's directory has its run's
STEP = re.compile(r"(?:step|checkpoint|ckpt|iter|global_step)[-_]?(\d+)", re.IGNORECASE)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model", "special_tokens_map.json")


@dataclass(frozen=True)
class Checkpoint:
    name: str  # its directory under OUTPUT
    model: str
    revision: str | None
    step: int | None


@dataclass
class SeriesResult:
    """series.json as a dict, and each checkpoint's Result in order."""

    series: dict
    checkpoints: list[Result] = field(default_factory=list)


def step_of(name: str) -> int | None:
    """The step a checkpoint's name gives: after step, checkpoint, ckpt or iter, else its last number."""
    found = STEP.search(name)
    if found:
        return int(found.group(1))
    numbers = re.findall(r"\d+", name)
    return int(numbers[-1]) if numbers else None


def checkpoints(config: Config) -> list[Checkpoint]:
    """The series' models in the order they are scored."""
    if config.revisions:
        return unique([Checkpoint(safe_name(r), config.model, r, step_of(r)) for r in config.revisions])
    specs = config.series or (config.model,)
    found: list[Checkpoint] = []
    for spec in specs:
        if GLOB.search(spec):
            folders = [p for p in glob.glob(str(Path(spec).expanduser())) if Path(p).is_dir()]
            if not folders:
                raise PplError(f"no checkpoint folders match {spec}", EXIT_MODEL)
            matched = [Checkpoint(safe_name(Path(p).name), p, None, step_of(Path(p).name)) for p in folders]
            found += sorted(matched, key=lambda c: (c.step is None, c.step or 0, c.name))
        else:
            name = PurePosixPath(spec.rstrip("/")).name or spec
            found.append(Checkpoint(safe_name(name), spec, None, step_of(name)))
    return unique(found)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("._") or "model"


def unique(found: list[Checkpoint]) -> list[Checkpoint]:
    """Two checkpoints with one name (runs/a/checkpoint-100, runs/b/checkpoint-100) get their parent's too."""
    names = [c.name for c in found]
    out = []
    for c in found:
        if names.count(c.name) > 1:
            parent = Path(c.model).parent.name
            c = Checkpoint(safe_name(f"{parent}__{c.name}"), c.model, c.revision, c.step)
        out.append(c)
    if len({c.name for c in out}) < len(out):
        raise PplError("two models of the series would write into the same directory; give them distinct names")
    return out


def evaluate_series(config: Config, progress: bool = False) -> SeriesResult:
    """Score every checkpoint of the series into OUTPUT/<name>/ and list them in OUTPUT/series.json."""
    from .pipeline import evaluate

    found = checkpoints(config)
    out = Path(config.output)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PplError(f"output directory {out} is not writable: {e.strerror}", EXIT_OUTPUT) from None
    tokenizer = shared_tokenizer(found, config)
    result = SeriesResult({"series": [], "config": {**config.to_dict(), "output": str(out)}})
    with OutputLock(out / LOCK_NAME, str(out)):
        for checkpoint in found:
            run_config = config.replace(model=checkpoint.model, revision=checkpoint.revision, series=(), revisions=(), output=str(out / checkpoint.name))
            done = finished(run_config)
            if done is not None and not config.overwrite:
                run = Result(done, out / checkpoint.name / "documents.jsonl")
            else:
                run = evaluate(run_config, progress=progress, tokenizer=tokenizer)
            result.checkpoints.append(run)
            result.series["series"].append(entry(checkpoint, run.summary, skipped=done is not None and not config.overwrite))
            write_atomic(out / SERIES_FILE, json.dumps(result.series, indent=2, ensure_ascii=False) + "\n")
    return result


def finished(config: Config) -> dict | None:
    """The summary of a checkpoint's run already finished with this configuration, else None."""
    path = Path(config.output) / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    ignored = ("output", "overwrite")
    same = {k: v for k, v in summary.get("config", {}).items() if k not in ignored} == {k: v for k, v in config.to_dict().items() if k not in ignored}
    return summary if same else None


def entry(checkpoint: Checkpoint, summary: dict, skipped: bool) -> dict:
    """A checkpoint's line in series.json."""
    return {
        "name": checkpoint.name,
        "model": checkpoint.model,
        "revision": checkpoint.revision,
        "step": checkpoint.step,
        "dir": checkpoint.name,
        "documents": summary["documents"],
        "tokens": summary["tokens"],
        "token_perplexity": summary["token_perplexity"],
        "bits_per_byte": summary["bits_per_byte"],
        "bootstrap": summary.get("bootstrap"),
        "already_finished": skipped,
    }


def shared_tokenizer(found: list[Checkpoint], config: Config):
    """The tokenizer every checkpoint uses, loaded once; checkpoints with different ones are refused.

    Local folders compare their tokenizer files; hub revisions and other models load each
    tokenizer and compare their vocabularies and how they split a probe text.
    """
    import transformers

    from .engine.loading import check_tokenizers, resolve_model, source_kwargs

    first = found[0]
    local = [Path(c.model) for c in found if resolve_model(c.model).kind == "directory" and c.revision is None]
    if len(local) == len(found):
        digests = [tokenizer_digest(folder) for folder in local]
        for c, d in zip(found[1:], digests[1:]):
            if d != digests[0]:
                raise PplError(f"the checkpoints {first.name} and {c.name} have different tokenizers; score them as separate runs", EXIT_MODEL)
    source = resolve_model(first.model)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.location, **source_kwargs(config.replace(revision=first.revision), source))
        if len(local) < len(found):
            for c in found[1:]:
                other_source = resolve_model(c.model)
                other = transformers.AutoTokenizer.from_pretrained(other_source.location, **source_kwargs(config.replace(revision=c.revision), other_source))
                check_tokenizers(tokenizer, other, first.name, c.name)
    except PplError:
        raise
    except Exception as e:
        from .engine.loading import explain_load_error

        raise PplError(explain_load_error(first.model, e, config), EXIT_MODEL) from None
    return tokenizer


def tokenizer_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def format_series(series: dict) -> str:
    """A line a checkpoint: its step, token perplexity with its interval, bits per byte."""
    from .output.summary import number

    lines = [f"{len(series['series'])} checkpoints in {series['config']['output']}:"]
    width = max(len(c["name"]) for c in series["series"])
    for c in series["series"]:
        interval = (c.get("bootstrap") or {}).get("token_perplexity")
        ci = f"  ({number(interval[0])} - {number(interval[1])})" if interval else ""
        step = f"step {c['step']:>8}" if c["step"] is not None else " " * 13
        again = "  (already finished)" if c["already_finished"] else ""
        lines.append(f"  {c['name']:{width}}  {step}  token perplexity {number(c['token_perplexity'])}{ci}  bits per byte {number(c['bits_per_byte'])}{again}")
    lines.append("ppl-eval compare and ppl-eval report take the series directory: each checkpoint against the one before")
    return "\n".join(lines)
