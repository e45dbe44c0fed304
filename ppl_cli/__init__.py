"""ppl-eval: exact, resumable corpus perplexity for Hugging Face causal LMs.

    from ppl_cli import Config, evaluate
    result = evaluate(Config(model="gpt2", data="wikitext"))
    print(result.summary["token_perplexity"])

The commands over finished runs are functions here too, each with its own frozen config:
compare_runs(CompareConfig(...)), build_report(ReportConfig(...)), select_records(SelectConfig(...)),
merge_runs(dirs, output).
"""

from .commands.compare import CompareConfig, compare_runs
from .commands.merge import merge_runs
from .commands.report import ReportConfig, build_report
from .commands.select import SelectConfig, select_records
from .config import Config, build_config
from .errors import PplError
from .output.run_directory import Result
from .pipeline import evaluate
from .series import SeriesResult, evaluate_series

__all__ = [
    "CompareConfig",
    "Config",
    "PplError",
    "ReportConfig",
    "Result",
    "SelectConfig",
    "SeriesResult",
    "build_config",
    "build_report",
    "compare_runs",
    "evaluate",
    "evaluate_series",
    "merge_runs",
    "select_records",
]
