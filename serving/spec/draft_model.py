"""A separate draft model (any local Llama-family folder sharing the target's tokenizer)
with its own paged KV cache.

State per sequence: the tokens whose draft K/V are in the draft's cache, and their block
table. Each call gets the sequence's full token list; the longest common prefix with the
cached tokens is what stays valid, so rejected drafts roll back by themselves (their slots
are simply recomputed) and a caller needs no separate "accepted n" message: the same code
serves the in-process proposer and the `draft` deployment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from serving.engine.block_pool import BlockPool
from serving.engine.scheduler import blocks_for
from serving.engine.sequence import Sequence
from serving.models.llama import LlamaForCausalLM
from serving.spec.forward import make_metadata, run_layers
from serving.spec.proposer import Drafts


@dataclass(slots=True)
class _DraftSeq:
    tokens: list[int] = field(default_factory=list)  # K/V computed for these, in order
    block_table: list[int] = field(default_factory=list)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class DraftModelProposer:
    name = "model"

    def __init__(
        self,
        model: LlamaForCausalLM,
        num_blocks: int,
        block_size: int,
        vocab_size: int | None = None,
    ):
        arch = model.arch
        self.model = model
        self.block_size = block_size
        dtype = model.embed_tokens.weight.dtype
        # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        # len(layers), not arch.num_layers: a truncated view of a model is a draft too
        self.kv_cache = torch.zeros(
            (len(model.layers), 2, num_blocks, block_size, arch.num_kv_heads, arch.head_dim),
            dtype=dtype,
        )
        self.pool = BlockPool(num_blocks)
        vocab = arch.vocab_size if vocab_size is None else min(vocab_size, arch.vocab_size)
        self.head_weight = model.lm_head.weight[:vocab]
        self.states: dict[str, _DraftSeq] = {}

    # --- Proposer ----------------------------------------------------------------------
    def propose(self, seqs: list[Sequence], ks: list[int]) -> Drafts:
        return Drafts(
            self.propose_tokens(
                [s.req_id for s in seqs],
                [s.prompt_token_ids + s.output_token_ids for s in seqs],
                ks,
            )
        )

    def release(self, req_id: str) -> None:
        st = self.states.pop(req_id, None)
        if st is not None:
            self.pool.free(st.block_table)

    # --- the work ----------------------------------------------------------------------
    def _sync(self, req_id: str, context: list[int], k: int, live: set[str]) -> int:
        """Roll the cached tokens back to what still matches `context` and reserve slots
        for the k - 1 drafts that get fed back; returns the k that fits (0: no room)."""
        st = self.states.setdefault(req_id, _DraftSeq())
        # keep at least the newest token to feed, so the first pass has logits to read
        st.tokens = st.tokens[: min(common_prefix(st.tokens, context), len(context) - 1)]
        needed = blocks_for(len(context) + k - 1, self.block_size) - len(st.block_table)
        if needed > 0 and not self.pool.can_allocate(needed):
            for other in [r for r in self.states if r not in live]:
                self.release(other)  # sequences the caller no longer has
        if needed > 0 and not self.pool.can_allocate(needed):
            self.release(req_id)
            return 0
        if needed > 0:
            st.block_table.extend(self.pool.allocate(needed))
        return k

    def _head(self, hidden: torch.Tensor) -> list[int]:
        logits = torch.nn.functional.linear(self.model.norm(hidden), self.head_weight)
        return logits.argmax(dim=-1).tolist()

    @torch.inference_mode()
    def propose_tokens(
        self, req_ids: list[str], contexts: list[list[int]], ks: list[int]
    ) -> list[list[int]]:
        """Up to ks[i] greedy draft tokens continuing `contexts[i]` (prompt + output)."""
        live = set(req_ids)
        ks = [
            self._sync(r, c, k, live) if k > 0 else 0
            for r, c, k in zip(req_ids, contexts, ks, strict=True)
        ]
        rows = [i for i, k in enumerate(ks) if k > 0]
        drafts: list[list[int]] = [[] for _ in req_ids]
        if not rows:
            return drafts
        num_layers = len(self.model.layers)
        states = {i: self.states[req_ids[i]] for i in rows}
        # pass 0: catch up on every token the draft has not seen (the whole prompt the first
        # time, then usually the accepted tokens of the last step plus the target's own)
        starts = [len(states[i].tokens) for i in rows]
        counts = [len(contexts[i]) - s for i, s in zip(rows, starts, strict=True)]
        ids = [t for i, s in zip(rows, starts, strict=True) for t in contexts[i][s:]]
        positions, meta = make_metadata(
            [states[i].block_table for i in rows], starts, counts, self.block_size
        )
        x = self.model.embed_tokens(torch.tensor(ids, dtype=torch.long))
        h = run_layers(self.model, x, positions, self.kv_cache, meta, 0, num_layers)
        last = torch.tensor(counts).cumsum(0) - 1
        for i, t in zip(rows, self._head(h[last]), strict=True):
            drafts[i].append(t)
            states[i].tokens = list(contexts[i])
        # passes 1..k-1: one token each, the previous draft
        for j in range(1, max(ks)):
            step_rows = [i for i in rows if ks[i] > j]
            positions, meta = make_metadata(
                [states[i].block_table for i in step_rows],
                [len(states[i].tokens) for i in step_rows],
                [1] * len(step_rows),
                self.block_size,
            )
            x = self.model.embed_tokens(
                torch.tensor([drafts[i][-1] for i in step_rows], dtype=torch.long)
            )
            h = run_layers(self.model, x, positions, self.kv_cache, meta, 0, num_layers)
            for i, t in zip(step_rows, self._head(h), strict=True):
                states[i].tokens.append(drafts[i][-1])
                drafts[i].append(t)
        return drafts
