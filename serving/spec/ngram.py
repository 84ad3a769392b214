"""Prompt-lookup drafting: propose the tokens that followed the last time the context ended
the same way. Free (no draft model) and strong on code edits, RAG and summaries, where the
output copies spans of the prompt."""

from __future__ import annotations


def propose_ngram(
    token_ids: list[int], k: int, max_ngram: int = 3, min_ngram: int = 1
) -> list[int]:
    """Up to `k` draft tokens for the sequence `token_ids` (prompt + output so far).

    For n from `max_ngram` down to `min_ngram`, take the suffix n-gram and look for its most
    recent earlier occurrence; propose the (up to k) tokens that followed it. Longer n-grams
    go first because a longer matching context predicts the continuation more reliably; the
    most recent occurrence goes first because local repetition (the span being copied right
    now) beats a distant one. Returns [] when no n-gram recurs, meaning "do not speculate".
    """
    if k <= 0 or min_ngram < 1 or max_ngram < min_ngram:
        return []
    length = len(token_ids)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = token_ids[length - n :]
        first = suffix[0]
        # start j < length - n so the occurrence is earlier than the suffix itself and has
        # at least one following token
        for j in range(length - n - 1, -1, -1):
            if token_ids[j] == first and token_ids[j : j + n] == suffix:
                return token_ids[j + n : j + n + k]
    return []
