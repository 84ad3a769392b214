"""Attention mass each quantization unit receives, measured on the fly during an eval.

Forward hooks on every attention layer recompute the chunk's (rotated) queries from the
layer input, score them against the keys the cache holds *now* (staged, like decode reads
them), and add each key token's softmax probability, summed over heads and queries, to its
unit. This is the `attention_mass` of `policies.kv_levels.BlockStats`; the engine
accumulates the same quantity during decode.
"""

from __future__ import annotations

import torch

from serving.eval.staged_cache import StagedCache
from serving.models.attention import AttentionMetadata
from serving.models.llama import LlamaForCausalLM
from serving.models.rope import apply_rope


class AttentionMassProbe:
    def __init__(self, model: LlamaForCausalLM, cache: StagedCache):
        self.cache = cache
        self.token_mass = torch.zeros(cache.kv.shape[2] * cache.block_size)  # [max_tokens]
        self._handles = [
            layer.self_attn.register_forward_hook(self._hook) for layer in model.layers
        ]

    def _hook(self, attn, args, _output) -> None:
        x, cos, sin, layer_cache, meta = args
        meta: AttentionMetadata
        n, end = meta.query_lens[0], meta.context_lens_list[0]
        q = attn.qkv_proj(x).split(attn.split_sizes, dim=-1)[0]
        q = apply_rope(q.view(n, attn.num_heads, attn.head_dim), cos, sin)  # [n, Hq, D]
        keys = layer_cache[0].reshape(-1, attn.num_kv_heads, attn.head_dim)[:end]  # [end, Hkv, D]
        group = attn.num_heads // attn.num_kv_heads
        qg = q.float().view(n, attn.num_kv_heads, group, attn.head_dim)
        scores = torch.einsum("nhgd,thd->hgnt", qg, keys.float()) * attn.scale  # [Hkv,G,n,end]
        q_pos = torch.arange(end - n, end)[:, None]
        scores.masked_fill_(torch.arange(end)[None, :] > q_pos, -torch.inf)
        self.token_mass[:end] += scores.softmax(dim=-1).sum(dim=(0, 1, 2))

    def publish(self, num_tokens: int) -> None:
        """Write the per-unit sums into the cache, where `restage` reads them."""
        g = self.cache.profile.quant_group_tokens
        num_units = num_tokens // g
        per_unit = self.token_mass[: num_units * g].view(num_units, g).sum(dim=1)
        self.cache.unit_mass = per_unit.tolist()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
