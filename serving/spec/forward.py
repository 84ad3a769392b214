"""Pieces of the target's forward pass that speculative decoding runs on their own.

A self-speculative draft runs the first N layers of the target, and the verify pass then
only runs layers N.. on the hidden states the draft already computed. `LlamaForCausalLM`
runs all layers at once, so the layer loop is repeated here over a layer range; the maths
is the model's own (its embedding, rope tables, layers, final norm and LM head).
"""

from __future__ import annotations

import torch

from serving.models.attention import AttentionMetadata
from serving.models.llama import LlamaForCausalLM


def make_metadata(
    block_tables: list[list[int]], starts: list[int], counts: list[int], block_size: int
) -> tuple[torch.Tensor, AttentionMetadata]:
    """(positions `[num_tokens]`, metadata) for `counts[i]` new tokens of sequence i at
    positions `starts[i]..starts[i]+counts[i]-1`, written into its `block_tables[i]`."""
    positions: list[int] = []
    slots: list[int] = []
    context_lens: list[int] = []
    for table, start, n in zip(block_tables, starts, counts, strict=True):
        for pos in range(start, start + n):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        context_lens.append(start + n)
    max_blocks = max(len(t) for t in block_tables)
    tables = torch.zeros((len(block_tables), max_blocks), dtype=torch.long)
    for i, table in enumerate(block_tables):
        tables[i, : len(table)] = torch.tensor(table, dtype=torch.long)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        block_tables=tables,
        context_lens=torch.tensor(context_lens, dtype=torch.long),
        query_lens=list(counts),
        context_lens_list=context_lens,
        all_decode=all(n == 1 for n in counts),
    )
    return torch.tensor(positions, dtype=torch.long), meta


def rope_for(model: LlamaForCausalLM, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin `[num_tokens, 1, head_dim]` as the model's forward builds them."""
    cos = model.rope_cos[positions].unsqueeze(1).to(dtype)
    sin = model.rope_sin[positions].unsqueeze(1).to(dtype)
    return cos, sin


def run_layers(
    model: LlamaForCausalLM,
    x: torch.Tensor,
    positions: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    start: int,
    end: int,
) -> torch.Tensor:
    """Hidden states `[num_tokens, hidden]` after layers `start..end-1` (no final norm);
    writes those layers' K/V of the new tokens into `kv_cache`."""
    cos, sin = rope_for(model, positions, x.dtype)
    tracks_layer = hasattr(meta, "layer")  # the staged-KV gather reads which layer it is in
    for i in range(start, end):
        if tracks_layer:
            meta.layer = i
        x = model.layers[i](x, cos, sin, kv_cache[i], meta)
    return x
