"""Turn next-token logits into tokens: greedy, temperature, top-k, top-p, seed, min_tokens.

The one sampler of the engine: a plain step draws with `sample`; a speculative step's
verifier draws from `distributions` with `seeded_generator`, so both see the same
processed distribution at every position and a seeded request's randomness comes from the
same stream.
"""

from __future__ import annotations

import torch

from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import Sequence

# Mixes the request seed with the token's position so a seeded request samples the same
# token whichever replica (prefill or decode) draws it.
_POSITION_STRIDE = 1_000_003


def _ban_stops(logits: torch.Tensor, seq: Sequence, eos_ids: tuple[int, ...]) -> None:
    """In place on `logits [n, vocab]`, `seq`'s next n positions: below `min_tokens`, EOS
    and stop tokens may not be sampled. Row j comes after j more output tokens, so e.g.
    with 2 outputs and min_tokens 4 rows 0 and 1 are banned and row 2 is not."""
    p = seq.params
    num_banned_rows = min(logits.shape[0], p.min_tokens - seq.num_output_tokens)
    if num_banned_rows <= 0:
        return
    banned = list(set(eos_ids) | set(p.stop_token_ids))
    if banned:
        for j in range(num_banned_rows):
            logits[j, banned] = float("-inf")


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits `[vocab]` → logits with everything outside top-k / nucleus set to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # keep a token if the mass before it is below top_p (the top token always stays)
        drop = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return logits


def _row_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """A non-greedy request's sampling distribution from one row of (stop-banned) logits
    `[vocab]`: temperature, then top-k and top-p, then softmax."""
    scaled = logits / params.temperature
    return torch.softmax(_filter_top_k_top_p(scaled, params.top_k, params.top_p), dim=-1)


def distributions(logits: torch.Tensor, seq: Sequence, eos_ids: tuple[int, ...]) -> torch.Tensor:
    """`logits [n, vocab]` at `seq`'s next n positions (modified in place) → per row what
    the sampler draws from there. Greedy: the stop-banned logits themselves, as only their
    argmax is used (a softmax could round two near-equal logits into a tie and move it)."""
    _ban_stops(logits, seq, eos_ids)
    if seq.params.greedy:
        return logits
    return torch.stack([_row_distribution(row, seq.params) for row in logits])


def seeded_generator(seq: Sequence) -> torch.Generator | None:
    """The generator of `seq`'s next draw: None (the global RNG) without a seed; else
    seeded by the seed and the position, so a draw does not depend on the batch or on
    which replica makes it."""
    seed = seq.params.seed
    if seed is None:
        return None
    return torch.Generator().manual_seed((seed * _POSITION_STRIDE + seq.num_tokens) % (2**63))


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...]) -> list[int]:
    """logits `[num_seqs, vocab]` (fp32, modified in place), one row per sequence in `seqs`."""
    dists = [distributions(logits[row : row + 1], s, eos_ids)[0] for row, s in enumerate(seqs)]
    # a greedy row's distribution is its (banned) row of `logits`: one batched argmax
    # answers them all; the sampled rows are drawn one by one
    tokens = logits.argmax(dim=-1).tolist()
    for row, seq in enumerate(seqs):
        if not seq.params.greedy:
            tokens[row] = int(torch.multinomial(dists[row], 1, generator=seeded_generator(seq)))
    return tokens
