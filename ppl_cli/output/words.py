"""--save-words: a document's words and each word's surprisal, from its tokens'. Pure functions.

Words are the whitespace-separated words of the text (`len(text.split())` of them), or the
corpus's own list (--words-field), scored as the words joined by single spaces. Every token of the
text belongs to exactly one word: the word its first non-whitespace character falls in; a token of
whitespace only goes with the word after it (as a leading space does), or, after the last word,
with the last word. A token whose characters reach into the next word (a tokenizer that merges
across a space) stays with the word it starts in: both words are flagged `shared_token`, and a word
left with no token of its own has no surprisal.

A word of tokens [a, b) (positions in the document's token sequence) has the surprisal

    sum over its tokens of -ln p(token | before)  -  ln P_b(E)  +  ln P_a(S)

with P_j the model's distribution for position j (the one that scores token j), S the class of the
word's first token and E the class of the token after its last: W, the tokens that begin a word
with the space marker (engine/word_starts.py), or N, the others but EOS. A word in running text
begins with a W token, so S = E = W there: Pimentel and Meister's correction, as minicons computes
it. The first word of a text without a leading space begins with an N token: it is divided by
P(N | BOS), the probability that the text starts with such a token (the paper's code does so too;
minicons leaves the first word uncorrected at its start). After the last word, E is "W or EOS": the
text ends there, and the end-of-sequence token marks the end of its last word as a word start
would (the paper's code counts EOS with W at every position; minicons never does). A word after a
newline or tab begins with that whitespace token, of class N (neither reference marks it). The
corrections telescope: a document's word surprisals add up to its NLL + ln P(S of the first word)
- ln P_end(W or EOS). A word whose first token is not scored (no BOS before the text) has none.
"""

from __future__ import annotations

import bisect
import re
from typing import NamedTuple

import numpy as np

WORD = re.compile(r"\S+")  # str.split()'s words, as character spans


class Words(NamedTuple):
    """A document's words: their characters (start, end) in the text and their tokens [a, b) among the
    text's tokens, and which share a token with a neighbour."""

    spans: list[tuple[int, int]]
    first: np.ndarray  # [w] int: each word's first token (of the text's tokens)
    end: np.ndarray  # [w] int: one past its last
    shared: np.ndarray  # [w] bool


def word_spans(text: str) -> list[tuple[int, int]]:
    """The whitespace-separated words of a text as character spans: str.split()'s words."""
    return [m.span() for m in WORD.finditer(text)]


def listed_spans(words: tuple[str, ...]) -> list[tuple[int, int]]:
    """--words-field: each listed word's span in the words joined by single spaces."""
    spans, start = [], 0
    for word in words:
        spans.append((start, start + len(word)))
        start += len(word) + 1
    return spans


def assign(text: str, spans: list[tuple[int, int]], offsets: np.ndarray) -> Words:
    """Each word's tokens, from the text's tokens' characters `offsets` [t, 2] (start, end)."""
    starts = [s for s, _ in spans]
    owner = np.empty(len(offsets), dtype=np.int64)
    shared = np.zeros(len(spans), dtype=bool)
    for t, (s, e) in enumerate(offsets.tolist()):
        visible = next((p for p in range(s, e) if not text[p].isspace()), None)
        if visible is None:  # whitespace only: the word after it, else the last
            owner[t] = min(bisect.bisect_left(starts, e), len(spans) - 1)
            continue
        k = max(bisect.bisect_right(starts, visible) - 1, 0)
        owner[t] = k
        reaches = bisect.bisect_left(starts, e) - 1  # the last word that starts before the token ends
        if reaches > k:
            shared[k : reaches + 1] = True
    owner = np.maximum.accumulate(owner) if len(owner) else owner
    words = np.arange(len(spans))
    return Words(spans, np.searchsorted(owner, words, "left"), np.searchsorted(owner, words, "right"), shared)


class Surprisals(NamedTuple):
    """Per word: its surprisal (NaN: none), the plain sum of its scored tokens' surprisals, its token count."""

    corrected: np.ndarray
    uncorrected: np.ndarray
    tokens: np.ndarray


def surprisals(words: Words, head: int, nll: np.ndarray, classes: dict[str, np.ndarray] | None, ids: np.ndarray, starts: np.ndarray | None) -> Surprisals:
    """Word surprisals in nats.

    `head`: tokens before the text in the sequence (BOS: 1); `nll` [n - 1]: the surprisal of
    sequence positions 1..n-1; `classes`: for the same positions, the log-probabilities of the
    classes ("bow": W, "not_bow": N) of the distribution that scores them, and "end": the
    log-probability of W or EOS after the last token (None: no correction); `ids` [n]: the
    sequence's tokens; `starts` [V]: which tokens begin a word."""
    n = len(ids)
    cumulative = np.concatenate([[0.0], np.cumsum(nll.astype(np.float64))])  # [n]: the NLL of positions 1..j-1 at j

    def nll_between(a: int, b: int) -> float:
        """The sum over scored positions in [a, b)."""
        return cumulative[max(b - 1, 0)] - cumulative[max(a - 1, 0)]

    def boundary(j: int) -> float:
        """ln P_j of the class of token j (j < n), or of W or EOS at the end."""
        if j >= n:
            return classes["end"]
        return (classes["bow"] if starts[ids[j]] else classes["not_bow"])[j - 1]

    first, end = words.first + head, words.end + head  # sequence positions
    count = words.end - words.first
    uncorrected = np.array([nll_between(a, b) for a, b in zip(first, end)])
    corrected = uncorrected.copy()
    has_tokens = count > 0
    corrected[~has_tokens] = np.nan
    if len(first) and first[0] < 1:  # its first token is not scored: no surprisal
        corrected[0] = np.nan
    if classes is not None:
        for k in np.nonzero(~np.isnan(corrected))[0]:
            corrected[k] += boundary(int(first[k])) - boundary(int(end[k]))
    return Surprisals(corrected, uncorrected, count)
