"""The two small interfaces a grammar engine implements: a backend and its per-sequence matcher.

Who calls what: the API's admission path calls `GrammarCache.get(spec)` (which calls
`GrammarBackend.compile` on a miss) and `GrammarBackend.new_matcher` once per sequence; the
engine's sampler then calls `fill_bitmasks` once per step for the whole batch and
`GrammarMatcher.accept_token` for each committed token. All on the engine's thread, in the
replica process; a matcher is owned by one sequence and is never shared.

Bitmask layout (both engines use it): int32 `[num_rows, ceil(vocab_size / 32)]`, bit
`t % 32` of word `t // 32` set when token `t` may come next.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from serving.structured.spec import StructuredSpec


class GrammarMatcher(Protocol):
    """One sequence's position in its grammar. Tokens are accepted one at a time as they are
    committed; `rollback` undoes the last n accepted tokens (speculative drafts)."""

    def accept_token(self, token_id: int) -> bool:
        """Advance by one token; False (state unchanged) when the grammar forbids it."""
        ...

    def rollback(self, num_tokens: int) -> None: ...

    def is_terminated(self) -> bool:
        """True once a stop token was accepted: the output is complete."""
        ...

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the next-token mask into `bitmask[row]` (int32, CPU, contiguous)."""
        ...

    def validate_tokens(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens of `token_ids` the grammar accepts; state unchanged."""
        ...


class GrammarBackend(Protocol):
    """A grammar engine bound to one tokenizer (and the model's vocab size)."""

    name: str
    vocab_size: int  # bits per bitmask row; the model's logits may be wider or narrower

    def compile(self, spec: StructuredSpec) -> object:
        """The engine's compiled form of `spec`; raises `InvalidStructuredOutput` when the
        engine refuses it. Expensive: call through `GrammarCache`."""
        ...

    def new_matcher(self, compiled: object) -> GrammarMatcher: ...

    def fill_bitmasks(
        self, matchers: Sequence[GrammarMatcher], rows: Sequence[int], bitmask: torch.Tensor
    ) -> None:
        """`bitmask[rows[i]]` ← the mask of `matchers[i]`, for the batch in one call."""
        ...


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allocate_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    # -1: every bit set, so a row nobody fills allows every token
    return torch.full((num_rows, bitmask_words(vocab_size)), -1, dtype=torch.int32)
