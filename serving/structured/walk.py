"""Constrained walks: generate text the way a sampler would, choosing among the tokens the
grammar allows, to check that whatever is chosen ends as valid output. Not on the serving
path; tests and benchmarks use it in place of a model.

A uniform choice among tens of thousands of allowed tokens rarely closes a string or an
array, so half of the steps take the first allowed token from a short list that ends
things (stop, quote, closing brackets, comma): walks stay short and still visit the
grammar's branches.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from serving.structured.backend import GrammarMatcher, allocate_bitmask

_CLOSING_TEXTS = ('"', "}", "]", ",", ":", "0", "1", "true", "null", "[", "{", "a", "A", "2")


@dataclass(frozen=True, slots=True)
class WalkResult:
    token_ids: list[int]  # without the stop token
    terminated: bool  # a stop token was accepted within the step budget


def allowed_token_ids(bitmask_row: torch.Tensor, vocab_size: int) -> torch.Tensor:
    bits = (bitmask_row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.flatten()[:vocab_size].nonzero().flatten()


def closing_token_ids(tokenizer: object, stop_token_ids: Sequence[int]) -> list[int]:
    """Stop tokens first, then single tokens for `_CLOSING_TEXTS`, in that order."""
    ids = list(stop_token_ids)
    for text in _CLOSING_TEXTS:
        encoded = tokenizer.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
        if len(encoded) == 1:
            ids.append(encoded[0])
    return ids


def random_walk(
    matcher: GrammarMatcher,
    vocab_size: int,
    rng: random.Random,
    preferred_ids: Sequence[int],
    max_steps: int = 2000,
    p_preferred: float = 0.5,
) -> WalkResult:
    """Choose allowed tokens until the matcher terminates (or `max_steps` pass); every
    chosen token must be accepted (a refusal is a bug in the mask and raises)."""
    bitmask = allocate_bitmask(1, vocab_size)
    out: list[int] = []
    for _ in range(max_steps):
        matcher.fill_bitmask(bitmask, 0)
        allowed = allowed_token_ids(bitmask[0], vocab_size)
        if allowed.numel() == 0:
            raise AssertionError(f"empty mask after {len(out)} tokens")
        token = None
        if rng.random() < p_preferred:
            words = bitmask[0].tolist()
            token = next((t for t in preferred_ids if (words[t >> 5] >> (t & 31)) & 1), None)
        if token is None:
            token = int(allowed[rng.randrange(allowed.numel())])
        if not matcher.accept_token(token):
            raise AssertionError(f"token {token} was in the mask but refused")
        if matcher.is_terminated():  # the token was a stop token
            return WalkResult(out, True)
        out.append(token)
    return WalkResult(out, False)
