"""Speculation for structured output: a constrained sequence's draft is cut at its first
token the grammar forbids, before the verify pass.

Verification samples every position from the grammar-masked distribution (the sampler's
processors mask row j by the grammar's state after draft[:j]), so a forbidden draft
token has target probability 0 and would be rejected anyway: cutting it saves verifying
it and everything after it, and the output is exactly the plain step's.
"""

from __future__ import annotations

import torch

from serving.engine.sequence import Sequence
from serving.spec.proposer import Drafts
from serving.structured.speculation import validate_draft


def constrain_drafts(seqs: list[Sequence], drafts: Drafts) -> Drafts:
    """`drafts` with each constrained sequence's tokens cut to the prefix its grammar
    accepts (and the hidden-state rows of the cut tokens dropped); unchanged when no
    sequence of the batch is constrained."""
    if all(s.grammar is None for s in seqs):
        return drafts
    tokens: list[list[int]] = []
    keep_rows: list[int] = []  # rows of drafts.hidden: [newest, d_1..d_k] per sequence
    offset = 0
    for seq, draft in zip(seqs, drafts.tokens, strict=True):
        valid = len(draft)
        if seq.grammar is not None and draft:
            valid = validate_draft(seq.grammar.matcher, draft)
        tokens.append(draft[:valid])
        keep_rows.extend(range(offset, offset + valid + 1))
        offset += len(draft) + 1
    if sum(len(t) for t in tokens) == sum(len(t) for t in drafts.tokens):
        return drafts
    hidden = drafts.hidden
    if hidden is not None:
        hidden = hidden.index_select(0, torch.tensor(keep_rows, dtype=torch.long))
    return Drafts(tokens, hidden, drafts.start_layer)
