"""The windowing conventions of the tools users quote numbers from, reproduced exactly.

Each convention says how documents become token sequences (joined or one by one, which prefix,
which text) and which windows score them; the engine and the metrics are shared.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from ..errors import PplError, PplWarning
from .windows import Window, llama_cpp_windows, lm_eval_windows, recipe_windows, sliding_windows, span_windows

JOIN = "\n\n"  # the HF guide joins its test split with blank lines; llama-cpp gets the same text
JOINED_ID = "(all documents joined)"
JOINED_CONVENTIONS = ("hf-recipe", "llama-cpp")
MAX_DEFAULT_WINDOW = 2048


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
    # --lengths: the context lengths of the curve (`window` is the largest), "prefix" (each document's
    # first L tokens) or "sliding" (windows of L tokens, `stride` apart), the tokens a document needs
    # to take part, and whether the prefix protocol needs a pass per length (logits that depend on
    # the input's length) rather than one pass at the largest
    lengths: tuple[int, ...] = ()
    protocol: str | None = None
    min_tokens: int = 0
    per_length: bool = False
    length_dependence: str | None = None  # why the logits depend on the input's length (per_length), as found
    bos_token: str | None = None  # the start token's text, where there is one

    @classmethod
    def from_description(cls, d: dict) -> Windowing:
        """The inverse of describe(), as summary.json holds it."""
        bos = d.get("bos_token") or {}
        return cls(
            d["convention"], d["window"], d["stride"], d["add_bos"], bos.get("id"), d.get("prefix_token_id"), d.get("detokenize", "none"),
            tuple(d.get("lengths", ())), d.get("protocol"), d.get("min_tokens", 0), d.get("passes") == "per length" and d.get("protocol") == "prefix",
            d.get("length_dependence"), bos.get("text"),
        )  # fmt: skip

    @property
    def needed_tokens(self) -> int:
        """The fewest tokens a document needs to take part in --lengths."""
        return tokens_needed(self.protocol, self.min_tokens, self.lengths)

    @property
    def step(self) -> int:
        """Tokens between the starts of consecutive windows, as the windows are made (`stride` is what was asked)."""
        if self.protocol == "prefix":
            return self.window  # one window a document
        if self.convention == "sliding":
            return min(self.stride, self.window - 1)  # sliding_windows' rule: no token is ever skipped
        if self.convention == "hf-recipe":
            return self.stride  # as published, even where it skips tokens
        return self.window  # lm-eval and llama-cpp: disjoint windows; the stride does not apply

    def describe(self) -> dict:
        out = {"convention": self.convention, "window": self.window, "stride": self.stride, "step": self.step, "add_bos": self.add_bos}
        if self.add_bos and self.bos_id is not None:
            out["bos_token"] = {"text": self.bos_token, "id": self.bos_id}
        if self.prefix_id is not None:
            out["prefix_token_id"] = self.prefix_id
        if self.detokenize != "none":
            out["detokenize"] = self.detokenize
        if self.lengths:
            out.update(lengths=list(self.lengths), protocol=self.protocol, min_tokens=self.min_tokens)
            out["passes"] = "per length" if self.per_length or self.protocol == "sliding" else "one"
            if self.length_dependence:
                out["length_dependence"] = self.length_dependence
        return out


def tokens_needed(protocol: str | None, min_tokens: int, lengths) -> int:
    """The fewest tokens a document needs to take part in --lengths: min_tokens and, under the prefix
    protocol, the shortest length; at least 2 (one token scored after another)."""
    return max(min_tokens, lengths[0] if protocol == "prefix" else 2)


def run_window(config, context_length: int | None) -> int:
    """The tokens of a run's window: the largest of --lengths, --window, or the model's context
    (at most MAX_DEFAULT_WINDOW)."""
    return config.lengths[-1] if config.lengths else config.window or min(context_length or MAX_DEFAULT_WINDOW, MAX_DEFAULT_WINDOW)


def resolve_windowing(config, lm) -> Windowing:
    """The windowing of a run: the config's choices, completed from the model and its tokenizer."""
    convention = config.convention
    window = run_window(config, lm.context_length)
    if lm.context_length and window > lm.context_length and not config.allow_beyond_context:
        what = f"--lengths up to {window}" if config.lengths else f"--window {window}"
        raise PplError(
            f"{what} is longer than the model's context length ({lm.context_length}); --allow-beyond-context scores it anyway (extrapolation)"
        )
    stride = config.stride or max(1, window // 2)
    if convention in ("hf-recipe", "lm-eval") and config.add_bos is not None:
        rule = "never adds special tokens" if convention == "hf-recipe" else "always prefixes its prefix token"
        raise PplError(f"--add-bos/--no-add-bos do not apply to --convention {convention}: it {rule}")
    start = start_token(config.bos_token, lm.tokenizer) if config.bos_token else lm.bos_id
    if config.conditional in ("conversations", "chat-wrap"):
        add_bos = False  # the chat template writes the special tokens
    elif config.bos_token:
        add_bos = True
    elif convention == "sliding":
        add_bos = config.add_bos if config.add_bos is not None else lm.bos_id is not None
    elif convention == "llama-cpp":  # llama.cpp adds BOS when the model's tokenizer does by default
        add_bos = config.add_bos if config.add_bos is not None else tokenizer_adds_bos(lm.tokenizer)
    else:
        add_bos = False
    if add_bos and start is None:
        raise PplError("--add-bos: this tokenizer defines no BOS or end-of-text token (--bos-token names one)")
    prefix_id = None
    if convention == "lm-eval":  # lm-eval's prefix_token_id: BOS, else EOS
        tok = lm.tokenizer
        prefix_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if prefix_id is None:
            raise PplError("--convention lm-eval: this tokenizer has neither a BOS nor an EOS token to prefix")
    bos_id = start if add_bos else None
    protocol = ("sliding" if config.stride is not None else "prefix") if config.lengths else None
    min_tokens = (config.min_tokens or (window if protocol == "prefix" else 2)) if config.lengths else 0
    bos_text = lm.tokenizer.convert_ids_to_tokens(bos_id) if bos_id is not None else None
    windowing = Windowing(convention, window, stride, add_bos, bos_id, prefix_id, config.detokenize, config.lengths, protocol, min_tokens, bos_token=bos_text)
    shortest = config.lengths[0] if config.lengths else window
    if config.stride is not None and (config.stride >= shortest if config.lengths else windowing.step != config.stride):
        if convention == "sliding":
            what = f"--lengths' shortest, {shortest}" if config.lengths else f"--window {window}"
            why = f"--stride {config.stride} is not below {what}: windows step by {shortest - 1} tokens instead, each scored span keeping one token of context"
        else:
            why = f"--stride does not apply to --convention {convention}: its windows step by the window, {window} tokens"
        warnings.warn(f"{why} (summary.json records both as windowing.stride and windowing.step)", PplWarning, stacklevel=2)
    return windowing


def start_token(text: str, tokenizer) -> int:
    """--bos-token's id: a single token of the vocabulary (or an added token), as the tokenizer writes it."""
    token_id = tokenizer.convert_tokens_to_ids(text)
    if token_id is None or (token_id == tokenizer.unk_token_id and text != tokenizer.unk_token):
        pieces = len(tokenizer(text, add_special_tokens=False).input_ids)
        raise PplError(f"--bos-token {text!r} is not a token of this tokenizer (its text is {pieces} tokens); give a token as the tokenizer writes it")
    return token_id


def start_line(windowing: Windowing, config, tokenizer) -> str | None:
    """The run's line about what each document is scored after: its start token, the prefix token, or none."""
    if config.conditional in ("conversations", "chat-wrap"):
        return None
    if windowing.convention == "lm-eval":
        return f"each document is scored after lm-eval's prefix token {tokenizer.convert_ids_to_tokens(windowing.prefix_id)!r} (id {windowing.prefix_id})"
    if windowing.convention == "hf-recipe":
        return "the documents are scored joined, without a start token, as the HF recipe does"
    if not windowing.add_bos:
        return "no start token: each document's first token is read, not scored (--bos-token TOKEN adds one)"
    whose = "" if config.bos_token else "; the tokenizer's BOS (--bos-token TOKEN or --no-add-bos to change it)"
    where = "each chunk's first token is replaced by" if windowing.convention == "llama-cpp" else "each document is scored after"
    return f"{where} the start token {windowing.bos_token!r} (id {windowing.bos_id}){whose}"


def tokenizer_adds_bos(tokenizer) -> bool:
    ids = tokenizer("a").input_ids
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


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


def conditional_windows(spans, windowing: Windowing) -> list[Window]:
    """The windows of a document scored given a context: each span's tokens in chunks of the
    convention's step (sliding: min(stride, window - 1); lm-eval: the window, as its rolling
    windows are), each chunk read after as much of the preceding context as fits, as lm-eval's
    loglikelihood reads its context (cut from the left)."""
    pairs = [(s[0], s[1]) for s in spans]
    if windowing.convention == "lm-eval":
        return span_windows(pairs, windowing.window, windowing.window, extra=1)
    return span_windows(pairs, windowing.window, windowing.step)


def first_token_replacement(windowing: Windowing) -> int | None:
    """llama-perplexity overwrites each chunk's first token with BOS when the model adds one."""
    return windowing.bos_id if windowing.convention == "llama-cpp" and windowing.add_bos else None


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
