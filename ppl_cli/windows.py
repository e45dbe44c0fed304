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
