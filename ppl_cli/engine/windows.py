"""Which tokens each forward pass reads and which it scores. Pure functions, no torch."""

from __future__ import annotations

from typing import NamedTuple


class Window(NamedTuple):
    """The model reads tokens [begin, end - 1] and scores tokens [score_from, end).

    Token j is predicted from tokens begin..j-1, so [begin, score_from) is context only.
    """

    begin: int
    end: int
    score_from: int


def sliding_windows(n: int, window: int, stride: int) -> list[Window]:
    """Windows over a sequence of n tokens: every token but the first is scored exactly once.

    For stride < window these are the Hugging Face "perplexity of fixed-length models" windows:
    they begin at 0, S, 2S, ... and each scores the tokens after the previous window's end, with
    at least window - stride tokens of context. A stride >= window would skip tokens, so the
    step becomes window - 1: disjoint scored spans, each with one token of context (the
    previous token), as lm-evaluation-harness's rolling windows do.
    """
    if window < 2:
        raise ValueError("window must be at least 2: a scored token needs one token of context")
    if stride < 1:
        raise ValueError("stride must be at least 1")
    step = min(stride, window - 1)
    windows = []
    begin, scored_until = 0, 1  # token 0 has no context and is never scored
    while scored_until < n:
        end = min(begin + window, n)
        windows.append(Window(begin, end, scored_until))
        scored_until = end
        begin += step
    return windows


def scored_token_count(n: int) -> int:
    """Tokens that sliding_windows scores in a sequence of n tokens."""
    return max(n - 1, 0)


def recipe_windows(n: int, window: int, stride: int) -> list[Window]:
    """The Hugging Face guide's windows as published, for any stride.

    Windows begin at 0, S, 2S, ... and score the tokens after the previous window's end. With
    S >= W the guide masks nothing, so each window scores all but its first token and the tokens
    between windows are never scored; that is reproduced, not corrected.
    """
    windows, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        score_from = max(prev_end, begin + 1)
        if score_from < end:
            windows.append(Window(begin, end, score_from))
        prev_end = end
        if end == n:
            break
    return windows


def lm_eval_windows(n: int, max_length: int) -> list[Window]:
    """lm-evaluation-harness's rolling windows (get_rolling_token_windows, context_len=1, made
    disjoint) over a sequence of n tokens whose first is the prefix token.

    Each forward pass reads max_length tokens and scores up to max_length: the first window all
    tokens after the prefix, the next ones max_length tokens with one token of context, and the
    last, shorter one with as much context as fills the window.
    """
    predictions = n - 1  # every token after the prefix
    if predictions <= 0:
        return []
    first = min(max_length, predictions)
    windows = [Window(0, first + 1, 1)]
    predicted = first
    while predicted < predictions:
        length = min(predictions - predicted, max_length)
        end = predicted + length  # in prediction positions; +1 in sequence positions
        windows.append(Window(end - max_length, end + 1, end - length + 1))
        predicted = end
    return windows


def llama_cpp_windows(n: int, ctx: int) -> list[Window]:
    """llama-perplexity's chunks: floor(n / ctx) disjoint chunks of ctx tokens (the tail is
    dropped), each scoring only its tokens after position ctx/2, i.e. ctx - 1 - ctx/2 tokens."""
    first = ctx // 2
    return [Window(k * ctx, (k + 1) * ctx, k * ctx + first + 1) for k in range(n // ctx)]


def span_windows(spans: list[tuple[int, int]], window: int, chunk: int, extra: int = 0) -> list[Window]:
    """Windows that score each span [a, b) of a sequence once, `chunk` tokens at a time, every window
    ending where its chunk ends and reading as much of what precedes it as fits.

    A window spans at most window + extra tokens: sliding reads its whole span (extra 0), lm-eval's
    spans are one longer, of which the model reads the first `window` (extra 1). A scored token in
    chunk k of its span has at least window + extra - chunk tokens of context, or all before it.
    Position 0 has no context and is never scored.
    """
    if chunk < 1 or chunk > window + extra - 1:
        raise ValueError("a chunk must leave at least one token of context in its window")
    out = []
    for a, b in spans:
        for start in range(max(a, 1), b, chunk):
            end = min(start + chunk, b)
            out.append(Window(max(0, end - window - extra), end, start))
    return out
