import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ppl_cli.engine.windows import Window, scored_token_count, sliding_windows


def test_hand_checked_overlapping():
    # n=10, W=4, S=2: windows begin 0, 2, 4, 6; each scores what the previous did not.
    assert sliding_windows(10, 4, 2) == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6), Window(6, 10, 8)]


def test_hand_checked_stride_at_least_window():
    # S >= W would skip tokens 4..5; the step becomes W - 1 = 3: one context token per window.
    expected = [Window(0, 4, 1), Window(3, 7, 4), Window(6, 10, 7)]
    assert sliding_windows(10, 4, 4) == expected
    assert sliding_windows(10, 4, 100) == expected


def test_short_sequences():
    assert sliding_windows(0, 4, 2) == []
    assert sliding_windows(1, 4, 2) == []  # a single token has no context: nothing to score
    assert sliding_windows(2, 4, 2) == [Window(0, 2, 1)]
    assert sliding_windows(4, 4, 2) == [Window(0, 4, 1)]  # fits one window: one plain forward pass


def test_invalid_arguments():
    with pytest.raises(ValueError):
        sliding_windows(10, 1, 1)
    with pytest.raises(ValueError):
        sliding_windows(10, 4, 0)


def recipe_windows(n, window, stride):
    """The HF guide's loop, written out: (begin, end, first target)."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        out.append((begin, end, max(prev_end, 1)))
        prev_end = end
        if end == n:
            break
    return out


@settings(max_examples=500, deadline=None)
@given(n=st.integers(0, 400), window=st.integers(2, 64), stride=st.integers(1, 80))
def test_every_token_but_the_first_scored_exactly_once(n, window, stride):
    windows = sliding_windows(n, window, stride)
    scored = [j for w in windows for j in range(w.score_from, w.end)]
    assert scored == list(range(1, n))
    assert len(scored) == scored_token_count(n)
    for w in windows:
        assert w.begin < w.score_from < w.end + 1  # at least one token of context
        assert w.score_from < w.end  # every window scores something
        assert w.end - w.begin <= window


@settings(max_examples=300, deadline=None)
@given(n=st.integers(2, 400), window=st.integers(2, 64), stride=st.integers(1, 63))
def test_equal_to_the_hf_recipe_when_stride_is_below_window(n, window, stride):
    if stride >= window:
        stride = window - 1
    assert [tuple(w) for w in sliding_windows(n, window, stride)] == recipe_windows(n, window, stride)
