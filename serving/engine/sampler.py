"""Turn a batch of next-token logits into tokens: greedy, temperature, top-k, top-p, seed."""

from __future__ import annotations

import torch

from serving.engine.sequence import Sequence

# Mixes the request seed with the token's position so a seeded request samples the same
# token whichever replica (prefill or decode) draws it.
_POSITION_STRIDE = 1_000_003


def _suppress_stops(logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...]) -> None:
    """Below `min_tokens`, EOS and stop tokens may not be sampled."""
    for row, seq in enumerate(seqs):
        if seq.num_output_tokens < seq.params.min_tokens:
            banned = list(set(eos_ids) | set(seq.params.stop_token_ids))
            if banned:
                logits[row, banned] = float("-inf")


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


def sample(logits: torch.Tensor, seqs: list[Sequence], eos_ids: tuple[int, ...]) -> list[int]:
    """logits `[num_seqs, vocab]` (fp32), one row per sequence in `seqs`."""
    _suppress_stops(logits, seqs, eos_ids)
    tokens = logits.argmax(dim=-1).tolist()
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        row_logits = _filter_top_k_top_p(logits[row] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row_logits, dim=-1)
        generator = None
        if p.seed is not None:
            generator = torch.Generator().manual_seed(
                (p.seed * _POSITION_STRIDE + seq.num_tokens) % (2**63)
            )
        tokens[row] = int(torch.multinomial(probs, 1, generator=generator))
    return tokens
