"""Prompt-lookup drafting (serving/spec/ngram.py) on hand-made token sequences."""

from __future__ import annotations

from serving.spec.ngram import propose_ngram


def test_repeat_found() -> None:
    #            the suffix [7, 8] occurred before, followed by 9, 10, 11
    tokens = [1, 7, 8, 9, 10, 11, 2, 7, 8]
    assert propose_ngram(tokens, k=3) == [9, 10, 11]
    assert propose_ngram(tokens, k=2) == [9, 10]


def test_proposal_is_cut_at_the_end_of_the_sequence() -> None:
    assert propose_ngram([5, 6, 1, 5, 6], k=4) == [1, 5, 6]


def test_longest_ngram_preferred() -> None:
    # 1-gram [3] recurs most recently at index 5 (-> 40), but the 2-gram [2, 3] only at
    # index 0 (-> 30): the longer context wins
    tokens = [2, 3, 30, 9, 9, 3, 40, 8, 2, 3]
    assert propose_ngram(tokens, k=1, max_ngram=2) == [30]
    assert propose_ngram(tokens, k=1, max_ngram=1) == [40]


def test_most_recent_occurrence() -> None:
    tokens = [4, 5, 100, 0, 4, 5, 200, 0, 4, 5]
    assert propose_ngram(tokens, k=1) == [200]


def test_no_match_returns_empty() -> None:
    assert propose_ngram([1, 2, 3, 4, 5], k=3) == []
    assert propose_ngram([], k=3) == []
    assert propose_ngram([7], k=3) == []


def test_min_ngram_limits_short_matches() -> None:
    tokens = [3, 50, 9, 3]  # only the 1-gram [3] recurs
    assert propose_ngram(tokens, k=2) == [50, 9]
    assert propose_ngram(tokens, k=2, min_ngram=2) == []


def test_k_zero_and_overlapping_repeats() -> None:
    assert propose_ngram([1, 2, 1, 2], k=0) == []
    # a run of one token: the suffix overlaps its own earlier occurrence
    assert propose_ngram([9, 9, 9, 9], k=3) == [9]
