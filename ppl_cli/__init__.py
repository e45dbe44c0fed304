"""ppl-eval: exact, resumable corpus perplexity for Hugging Face causal LMs.

    from ppl_cli import Config, evaluate
    result = evaluate(Config(model="gpt2", data="wikitext"))
    print(result.summary["token_perplexity"])
"""

from .config import Config, build_config
from .errors import PplError
from .pipeline import Result, evaluate

__all__ = ["Config", "PplError", "Result", "build_config", "evaluate"]
