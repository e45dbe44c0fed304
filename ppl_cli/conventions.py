"""The windowing conventions of the tools users quote numbers from, reproduced exactly.

Each convention says how documents become token sequences (joined or one by one, which prefix,
which text) and which windows score them; the engine and the metrics are shared.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .documents import Document
from . import metrics
from .metrics import perplexity
from .windows import Window, llama_cpp_windows, lm_eval_windows, recipe_windows, sliding_windows

JOIN = "\n\n"  # the HF guide joins its test split with blank lines; llama-cpp gets the same text
JOINED_ID = "(all documents joined)"


@dataclass(frozen=True)
class Windowing:
    """Everything that decides which tokens are scored with which context (recorded in run.json)."""

    convention: str
    window: int
    stride: int
    add_bos: bool  # sliding: BOS prefix; llama-cpp: BOS replaces each chunk's first token
    bos_id: int | None
    prefix_id: int | None = None  # lm-eval: the token prepended to every document
    detokenize: str = "none"

    @property
    def joins_documents(self) -> bool:
        return self.convention in ("hf-recipe", "llama-cpp")

    @classmethod
    def from_description(cls, d: dict) -> Windowing:
        """The inverse of describe(), as summary.json holds it (without the token ids it omits)."""
        return cls(
            d["convention"], d["window"], d["stride"], d["add_bos"], None, d.get("prefix_token_id"), d.get("detokenize", "none")
        )

    def describe(self) -> dict:
        out = {"convention": self.convention, "window": self.window, "stride": self.stride, "add_bos": self.add_bos}
        if self.prefix_id is not None:
            out["prefix_token_id"] = self.prefix_id
        if self.detokenize != "none":
            out["detokenize"] = self.detokenize
        return out


def prepare(docs: list[Document], windowing: Windowing) -> list[Document]:
    """hf-recipe and llama-cpp score the corpus as one sequence: the documents joined."""
    if windowing.joins_documents:
        return [Document(JOINED_ID, JOIN.join(doc.text for doc in docs))]
    return docs


def text_to_score(text: str, windowing: Windowing) -> str:
    return wikitext_detokenize(text) if windowing.detokenize == "wikitext" else text


def prefix(windowing: Windowing) -> list[int]:
    if windowing.convention == "lm-eval":
        return [windowing.prefix_id]
    if windowing.convention == "sliding" and windowing.add_bos:
        return [windowing.bos_id]
    return []


def windows(n: int, windowing: Windowing) -> list[Window]:
    if windowing.convention == "hf-recipe":
        return recipe_windows(n, windowing.window, windowing.stride)
    if windowing.convention == "lm-eval":
        return lm_eval_windows(n, windowing.window)
    if windowing.convention == "llama-cpp":
        return llama_cpp_windows(n, windowing.window)
    return sliding_windows(n, windowing.window, windowing.stride)


def first_token_replacement(windowing: Windowing) -> int | None:
    """llama-perplexity overwrites each chunk's first token with BOS when the model adds one."""
    return windowing.bos_id if windowing.convention == "llama-cpp" and windowing.add_bos else None


def count_words(text: str, windowing: Windowing) -> int:
    """Whitespace-separated words; lm-eval counts len(re.split(r"\\s+", text)), which also counts
    the empty strings before leading and after trailing whitespace."""
    if windowing.convention == "lm-eval":
        return len(re.split(r"\s+", text))
    return metrics.count_words(text)


def wikitext_detokenize(string: str) -> str:
    """lm-evaluation-harness's wikitext_detokenizer (tasks/wikitext/preprocess_wikitext.py), step for step."""
    # contractions
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    # number separators
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    # punctuation
    string = string.replace(" : ", ": ")
    string = string.replace(" ; ", "; ")
    string = string.replace(" . ", ". ")
    string = string.replace(" ! ", "! ")
    string = string.replace(" ? ", "? ")
    string = string.replace(" , ", ", ")
    # double brackets
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    # miscellaneous
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")
    return string


def convention_summary(documents: list[dict], convention: str) -> dict:
    """The numbers a convention's own tool reports besides the perplexity."""
    if convention == "hf-recipe":
        nll = sum(d["published_nll_sum"] for d in documents)
        tokens = sum(d["published_tokens"] for d in documents)
        return {"hf_recipe_published": {"nll_sum": nll, "tokens": tokens, "token_perplexity": perplexity(nll, tokens)}}
    if convention == "llama-cpp":
        return {"llama_cpp_uncertainty": llama_cpp_uncertainty(documents)}
    return {}


def llama_cpp_uncertainty(documents: list[dict]) -> float | None:
    """llama-perplexity's '+/-': ppl * sqrt(var(nll) / (count - 1)), var over the scored tokens."""
    count = sum(d["tokens"] for d in documents)
    if count < 2:
        return None
    mean = sum(d["nll_sum"] for d in documents) / count
    variance = sum(d["nll_sq_sum"] for d in documents) / count - mean * mean
    return math.exp(mean) * math.sqrt(max(variance, 0.0) / (count - 1))
