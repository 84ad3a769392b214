"""Logprobs of sampled and prompt tokens, as vLLM's default `logprobs_mode` (`raw_logprobs`)
gives them: the log-softmax of the model's raw logits, before min_tokens, penalties,
`logit_bias`, `bad_words`, temperature, min_p, top-k and top-p. They describe the model,
not the sampler's settings, so they are the same whatever a request samples with.

Only rows of requests that ask for them are computed (a copy taken before the sampler
edits the logits in place); other requests pay nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """One position: the chosen token's logprob and the `num_top` most likely tokens."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


def raw_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """`[n, vocab]` log-softmax of raw fp32 logits (a new tensor: the sampler may edit
    `logits` in place afterwards)."""
    return torch.log_softmax(logits.float(), dim=-1)


def pick(logprobs: torch.Tensor, token_ids: list[int], num_top: int) -> list[TokenLogprobs]:
    """Per row of `logprobs [n, vocab]` (n = len(token_ids)): `token_ids[row]`'s logprob
    and the `num_top` best."""
    if not token_ids:
        return []
    rows = torch.arange(len(token_ids))
    chosen = logprobs[rows, torch.tensor(token_ids)].tolist()
    if num_top > 0:
        values, ids = torch.topk(logprobs[: len(token_ids)], num_top, dim=-1)
        pairs = zip(ids.tolist(), values.tolist(), strict=True)
        tops = [tuple(zip(i, v, strict=True)) for i, v in pairs]
    else:
        tops = [()] * len(token_ids)
    return [TokenLogprobs(t, lp, top) for t, lp, top in zip(token_ids, chosen, tops, strict=True)]
