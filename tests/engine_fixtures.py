"""Fixtures the engines' tests share (a pytest plugin of conftest.py): WikiText-2 articles as
documents, pairs and a longer corpus, every run of RUNS through the transformers engine to compare
the other engines with, and the vLLM environment's Python."""

import json
import os
from pathlib import Path

import pytest

from conftest import lines, vllm_python_or_skip, wikitext_valid_or_skip

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # relative, on a document's nll_sum
WINDOW = 128
RUNS = {  # name -> (data file, Config fields), each run by both engines
    "sliding": ("articles", {"window": WINDOW}),
    "lm-eval": ("articles", {"window": WINDOW, "convention": "lm-eval"}),
    "llama-cpp": ("articles", {"window": WINDOW, "convention": "llama-cpp"}),
    "hf-recipe": ("articles", {"window": WINDOW, "convention": "hf-recipe", "stride": WINDOW // 2}),
    "lengths": ("articles", {"lengths": "32,64,128", "min_tokens": 32}),
    "pairs": ("pairs", {"window": WINDOW, "context_field": "context", "ifd": True}),
    "kept": ("articles", {"window": WINDOW, "save_tokens": True, "signals": True, "save_words": True, "bow_correction": False, "group_by": "group"}),
    "shard-0": ("articles", {"window": WINDOW, "shard": "0/2"}),
    "shard-1": ("articles", {"window": WINDOW, "shard": "1/2"}),
}
CLI_RUN = ("many", {"window": WINDOW, "stride": WINDOW - 1, "max_batch_tokens": WINDOW})  # a window a batch: each document written as it ends


@pytest.fixture(scope="session")
def vllm_python() -> str:
    return vllm_python_or_skip()


def vllm_env(**extra) -> dict:
    """The environment of a process run by the vLLM environment's Python: ppl-eval from this checkout."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict[str, Path]:
    """Four WikiText-2 validation articles, each cut to its first ~700 characters (160-220
    SmolLM2 tokens, two windows), in two groups; the same as context/continuation pairs; and the
    articles twice over (8 documents, for runs stopped in the middle)."""
    from ppl_cli import Config
    from ppl_cli.data.documents import load_documents

    docs = load_documents(Config(data=(str(wikitext_valid_or_skip()),)))[:4]
    folder = tmp_path_factory.mktemp("engine-data")
    texts = [doc.text[: doc.text.rfind(" ", 0, 700)] for doc in docs]
    articles = folder / "articles.jsonl"
    articles.write_text("".join(json.dumps({"id": doc.id, "text": t, "group": "ab"[k % 2]}) + "\n" for k, (doc, t) in enumerate(zip(docs, texts))))
    pairs = folder / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": doc.id, "context": t[: len(t) // 3], "text": t[len(t) // 3 :]}) + "\n" for doc, t in zip(docs, texts)))
    many = folder / "many.jsonl"
    many.write_text("".join(json.dumps({"id": f"{doc.id} ({k})", "text": t}) + "\n" for k in range(2) for doc, t in zip(docs, texts)))
    return {"articles": articles, "pairs": pairs, "many": many}


@pytest.fixture(scope="session")
def transformers_runs(smollm2, data, tmp_path_factory) -> dict[str, Path]:
    """Every run of RUNS, and the CLI runs' settings, through the transformers engine (SmolLM2 in memory, float32)."""
    from ppl_cli import Config, evaluate

    out = tmp_path_factory.mktemp("transformers-runs")
    for name, (which, fields) in {**RUNS, "cli": CLI_RUN}.items():
        evaluate(Config(data=(str(data[which]),), output=str(out / name), **fields), model=smollm2.model, tokenizer=smollm2.tokenizer)
    return {name: out / name for name in [*RUNS, "cli"]}


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in lines(run / "documents.jsonl")]


def assert_close(a: float, b: float, what: str) -> None:
    assert abs(a - b) <= TOLERANCE * abs(b), f"{what}: {a} vs {b} ({abs(a - b) / abs(b):.2e} relative)"
