"""The decoder stack every family shares: embed, run the layers over the paged KV cache,
final norm, LM head. A family's model subclasses `CausalLM` and builds these attributes:

- `arch`: its hyper-parameters (`LlamaArch`, `GPTArch`);
- `embed_tokens`, `layers`, `norm`, `lm_head`;
- `rope_cos`, `rope_sin`: `[max_positions, rotary_dim]` tables in the layout its
  attention rotates with, as `rope_tables` makes them (the loader rebuilds them with it
  after loading weights onto a model built on the meta device).

Each layer is called as `layer(x, cos, sin, layer_cache, meta)`; the engine, speculative
decoding (`serving.spec.forward`) and evaluation use nothing else of a model.
"""

from __future__ import annotations

import torch
from torch import nn

from serving.models.attention import AttentionMetadata
from serving.models.rope import rope_cache


class CausalLM(nn.Module):
    arch: object
    embed_tokens: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module
    lm_head: nn.Module
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    @classmethod
    def rope_tables(cls, arch, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin `[max_positions, rotary_dim]`: HF's rotate-half layout, all channels."""
        return rope_cache(arch, max_positions)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states `[num_tokens, hidden_size]` after the final norm."""
        x = self.embed_tokens(input_ids)
        dtype = x.dtype
        cos = self.rope_cos[positions].unsqueeze(1).to(dtype)  # [T, 1, D]
        sin = self.rope_sin[positions].unsqueeze(1).to(dtype)
        for i, (layer, layer_cache) in enumerate(zip(self.layers, kv_cache, strict=True)):
            meta.layer = i
            x = layer(x, cos, sin, layer_cache, meta)
        return self.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[n, hidden]` → fp32 logits `[n, vocab_size]`."""
        return self.lm_head(hidden).float()
