"""Turn next-token logits into tokens: the request's logit adjustments
(`serving.engine.logits_processors`: min_tokens, logit_bias, bad_words, penalties), then
greedy, or temperature, min_p, top-k, top-p and a seeded draw.

The one sampler of the engine: a plain step draws with `sample`; a speculative step's
verifier draws from `distributions` with `seeded_generator`, so both see the same
processed distribution at every position (row j of a speculative step counts the j
drafted tokens before it as output, as the plain step will once they are accepted) and a
seeded request's randomness comes from the same stream.
"""

from __future__ import annotations

import torch

from serving.engine.logits_processors import Row, process, speculative_rows
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import Sequence
from serving.kernels.greedy import argmax_rows

# Mixes the request seed with the token's position so a seeded request samples the same
# token whichever replica (prefill or decode) draws it.
_POSITION_STRIDE = 1_000_003


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


def _filter_min_p(scaled: torch.Tensor, min_p: float) -> torch.Tensor:
    """vLLM's min_p on temperature-scaled logits `[vocab]`: drop tokens less likely than
    min_p times the most likely one."""
    if min_p <= 0.0:
        return scaled
    probs = torch.softmax(scaled, dim=-1)
    return scaled.masked_fill(probs < min_p * probs.max(), float("-inf"))


def _row_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """A non-greedy request's sampling distribution from one row of processed logits
    `[vocab]`: temperature, min_p, then top-k and top-p, then softmax."""
    scaled = _filter_min_p(logits / params.temperature, params.min_p)
    return torch.softmax(_filter_top_k_top_p(scaled, params.top_k, params.top_p), dim=-1)


def distributions(
    logits: torch.Tensor, seq: Sequence, eos_ids: tuple[int, ...], draft: list[int]
) -> torch.Tensor:
    """`logits [k+1, vocab]` at `seq`'s next k+1 positions, row j after `draft[:j]`
    (modified in place) → per row what the sampler draws from there. Greedy: the processed
    logits themselves, as only their argmax is used (a softmax could round two near-equal
    logits into a tie and move it)."""
    if logits.shape[0] != len(draft) + 1:
        raise ValueError(f"{len(draft)} drafted tokens need {len(draft) + 1} rows of logits")
    process(logits, speculative_rows(seq, draft), eos_ids)
    if seq.params.greedy:
        return logits
    return torch.stack([_row_distribution(row, seq.params) for row in logits])


def seeded_generator(seq: Sequence) -> torch.Generator | None:
    """The generator of `seq`'s next draw: None (the global RNG) without a seed; else
    seeded by the seed and the position, so a draw does not depend on the batch or on
    which replica makes it."""
    return position_generator(seq, 0)


def position_generator(seq: Sequence, ahead: int) -> torch.Generator | None:
    """The generator of the draw `ahead` tokens after `seq`'s next one (speculative
    verification draws at several positions in one step): the draw plain decoding makes
    there, whatever was drafted."""
    seed = seq.params.seed
    if seed is None:
        return None
    position = seq.num_tokens + ahead
    return torch.Generator().manual_seed((seed * _POSITION_STRIDE + position) % (2**63))


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...]) -> list[int]:
    """logits `[num_seqs, vocab]` (fp32, modified in place), one row per sequence in `seqs`."""
    process(logits, [Row(s) for s in seqs], eos_ids)  # the whole batch at once
    # a greedy row's distribution is its processed row of `logits`: one batched argmax
    # answers them all (a vectorised kernel: torch's argmax reads one value at a time); the
    # sampled rows are drawn one by one
    tokens = argmax_rows(logits).tolist()
    for row, seq in enumerate(seqs):
        if not seq.params.greedy:
            dist = _row_distribution(logits[row], seq.params)
            tokens[row] = int(torch.multinomial(dist, 1, generator=seeded_generator(seq)))
    return tokens
