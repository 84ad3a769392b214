"""Grammar-constrained speculative decoding: which draft tokens a grammar allows, and the
masks the verifier applies at each draft position.

The verifier of a constrained sequence must sample every position from the masked
distribution, so position j's mask is the grammar's state after draft tokens [0, j). A
draft token the grammar forbids has target probability 0 under that mask and would be
rejected anyway; truncating the draft at the first such token saves verifying the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from serving.structured.backend import GrammarMatcher


def validate_draft(matcher: GrammarMatcher, draft_token_ids: Sequence[int]) -> int:
    """Length of the longest prefix of the draft the grammar accepts; matcher unchanged.
    The proposer's draft is cut there before the verify pass."""
    return matcher.validate_tokens(draft_token_ids)


def fill_draft_bitmasks(
    matcher: GrammarMatcher,
    draft_token_ids: Sequence[int],
    bitmask: torch.Tensor,
    first_row: int = 0,
) -> int:
    """Rows `first_row + j` of `bitmask` ← the mask after the first j draft tokens, for
    j = 0..num_valid, where num_valid (returned) counts the leading draft tokens the grammar
    accepts. Rows past num_valid are left as they were: verification stops at the first
    forbidden token, so they are never read. The matcher is left as it was.

    Example: draft [a, b, c] with c forbidden → rows 0, 1, 2 filled (before a, after a,
    after b), returns 2."""
    num_valid = 0
    matcher.fill_bitmask(bitmask, first_row)
    for t in draft_token_ids:
        if matcher.is_terminated() or not matcher.accept_token(t):
            break
        num_valid += 1
        if matcher.is_terminated():  # a stop token ends the output: no position after it
            break
        matcher.fill_bitmask(bitmask, first_row + num_valid)
    matcher.rollback(num_valid)
    return num_valid
