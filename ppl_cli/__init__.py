"""ppl-eval: exact, resumable corpus perplexity for Hugging Face causal LMs.

    from ppl_cli import Config, evaluate, score
    result = evaluate(Config(model="gpt2", data="wikitext"))
    print(result.summary["token_perplexity"])
    print(score(["A list of texts.", "Scored from Python."]).summary["token_perplexity"])

The commands over finished runs are functions here too, each with its own frozen config:
compare_runs(CompareConfig(...)), build_report(ReportConfig(...)), select_records(SelectConfig(...)),
merge_runs(dirs, output). Each name is imported when first used, so that `import ppl_cli` (and
`ppl-eval --help`) stays quick.
"""

from __future__ import annotations

import importlib

WHERE = {  # name -> the module that defines it
    "CompareConfig": "commands.compare",
    "compare_runs": "commands.compare",
    "merge_runs": "commands.merge",
    "ReportConfig": "commands.report",
    "build_report": "commands.report",
    "SelectConfig": "commands.select",
    "select_records": "commands.select",
    "Config": "config",
    "build_config": "config",
    "PplError": "errors",
    "PplWarning": "errors",
    "Result": "output.run_directory",
    "evaluate": "pipeline",
    "load": "api",
    "score": "api",
    "SeriesResult": "series",
    "evaluate_series": "series",
}
__all__ = sorted(WHERE)


def __getattr__(name: str):
    if name not in WHERE:
        raise AttributeError(f"module 'ppl_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *WHERE])
