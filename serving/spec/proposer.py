"""Draft proposers: who guesses the next k tokens of each sequence in a decode batch.

Contract (the engine thread calls `propose` once per speculative step, for the whole
batch): every sequence in `seqs` is a running decode sequence whose newest token is not
computed yet (`num_computed_tokens == num_tokens - 1`), and whose block table already has
slots for positions up to `num_computed_tokens + ks[i]`. A proposer returns at most
`ks[i]` tokens per sequence; it may return fewer (n-gram: no match).

Proposers here draft deterministically (argmax or lookup), so the verifier treats the
draft as a point mass (`draft_probs=None`): acceptance probability is p_target(token),
which keeps the output exactly the target's distribution (see `verify.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from serving.engine.sequence import Sequence
from serving.spec.forward import make_metadata, run_layers
from serving.spec.ngram import propose_ngram


@dataclass(slots=True)
class Drafts:
    tokens: list[list[int]]  # per sequence, the drafted tokens (0..k_i of them)
    # Self-speculation: the target's hidden states after layer `start_layer` for each
    # sequence's [newest token, drafts...] (rows in batch order), so verification only runs
    # the remaining layers. None: verification runs the whole model from the embeddings.
    hidden: torch.Tensor | None = None  # [sum(len(tokens_i) + 1), hidden_size]
    start_layer: int = 0


class Proposer(Protocol):
    name: str

    def propose(self, seqs: list[Sequence], ks: list[int]) -> Drafts: ...

    def release(self, req_id: str) -> None:
        """The sequence left the engine (finished, aborted, preempted): drop its state."""


def newest_token(seq: Sequence) -> int:
    return seq.output_token_ids[-1] if seq.output_token_ids else seq.prompt_token_ids[-1]


class NgramProposer:
    """Prompt lookup: no model, no KV; drafts the continuation of the latest n-gram match."""

    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, seqs: list[Sequence], ks: list[int]) -> Drafts:
        tokens = [
            propose_ngram(
                s.prompt_token_ids + s.output_token_ids, k, self.max_ngram, self.min_ngram
            )
            if k > 0
            else []
            for s, k in zip(seqs, ks, strict=True)
        ]
        return Drafts(tokens)

    def release(self, req_id: str) -> None:
        pass


class TruncatedDraft:
    """Self-speculation (LayerSkip-style): the target's first `num_layers` layers, its final
    norm and its LM head restricted to the first `vocab_size` token ids.

    No extra weights and no extra KV: the first N layers of the draft *are* the target's,
    so the K/V the draft writes for a token are the K/V the target would write there. The
    draft therefore keeps its KV in the target's cache (layers 0..N-1 of the sequence's own
    blocks); rolling it back is the engine's rollback of `num_computed_tokens`, and the
    slots of rejected tokens are overwritten when their positions are computed again. The
    verify pass reuses the draft's layer-N hidden states and runs only layers N.. .

    Why a vocabulary slice: on CPU the LM head (49k x 576 for SmolLM2) costs more than all
    decoder layers of a decode step; BPE ids are roughly in merge order, i.e. frequency
    order, so the first ids cover most drafted tokens at a fraction of the cost (as
    FR-Spec does). A token outside the slice is never drafted, which only costs acceptance.
    """

    name = "truncated"

    def __init__(self, runner, num_layers: int, vocab_size: int | None = None):
        model = runner.model
        if not 0 < num_layers <= len(model.layers):
            raise ValueError(
                f"num_draft_layers must be in 1..{len(model.layers)}, got {num_layers}"
            )
        self.runner = runner
        self.model = model
        self.num_layers = num_layers
        vocab = (
            model.arch.vocab_size if vocab_size is None else min(vocab_size, model.arch.vocab_size)
        )
        # a view: the first rows of the (tied) LM head, no copy
        self.head_weight = model.lm_head.weight[:vocab]

    def _draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(self.model.norm(hidden), self.head_weight)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], ks: list[int]) -> Drafts:
        model, bs = self.model, self.runner.block_size
        kv_cache = self.runner.kv_cache
        starts = [s.num_computed_tokens for s in seqs]
        current = [newest_token(s) for s in seqs]
        tokens: list[list[int]] = [[] for _ in seqs]
        hidden_rows: list[list[torch.Tensor]] = [[] for _ in seqs]
        # Pass j feeds every sequence with k_i >= j its token at position start_i + j; the
        # last pass of a sequence (j == k_i) only fills KV and hidden, it needs no logits.
        for j in range(max(ks) + 1):
            rows = [i for i, k in enumerate(ks) if k >= j]
            positions, meta = make_metadata(
                [seqs[i].block_table for i in rows],
                [starts[i] + j for i in rows],
                [1] * len(rows),
                bs,
            )
            x = model.embed_tokens(torch.tensor([current[i] for i in rows], dtype=torch.long))
            h = run_layers(model, x, positions, kv_cache, meta, 0, self.num_layers)
            for r, i in enumerate(rows):
                hidden_rows[i].append(h[r])
            want = [r for r, i in enumerate(rows) if ks[i] > j]
            if want:
                best = self._draft_logits(h[want]).argmax(dim=-1).tolist()
                for r, t in zip(want, best, strict=True):
                    i = rows[r]
                    tokens[i].append(t)
                    current[i] = t
        hidden = torch.stack([row for rows_i in hidden_rows for row in rows_i])
        return Drafts(tokens, hidden, self.num_layers)

    def release(self, req_id: str) -> None:
        pass
