"""Layers shared by the GPT-style families: attention over the paged KV cache with fused
q/k/v and rotary on the first `rotary_dim` channels of each head (either pairing
convention; GPT-NeoX, GPT-J), a biased feed-forward, and the model around them (LayerNorm
with bias at the end, an LM head that may carry a bias; BLOOM too). Each family's module
chooses the residual layout of its layers and maps its checkpoint's names to these.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from serving.models.arch import GPTArch
from serving.models.attention import AttentionMetadata, paged_attention, write_kv
from serving.models.causal_lm import CausalLM
from serving.models.rope import apply_partial_rope, rope_cache

_tanh_gelu = partial(F.gelu, approximate="tanh")
# HF `hidden_act` / `activation_function` names; the tanh ones are one formula written
# several ways (gelu_new, gelu_fast, gelu_pytorch_tanh), equal up to float rounding.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": _tanh_gelu,
    "gelu_fast": _tanh_gelu,
    "gelu_pytorch_tanh": _tanh_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(
            f"activation {name!r} is not supported; choose one of {sorted(ACTIVATIONS)}"
        )
    return name


class RotaryAttention(nn.Module):
    """Multi-head attention whose q/k/v weights are stacked q (all heads), k, v, as
    Llama's `qkv_proj` is; `interleaved` picks GPT-J's rotary pairing over NeoX's."""

    def __init__(self, arch: GPTArch, interleaved: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            arch.num_heads,
            arch.num_kv_heads,
            arch.head_dim,
        )
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.interleaved = interleaved
        bias = arch.attention_bias
        self.qkv_proj = nn.Linear(arch.hidden_size, q_size + 2 * kv_size, bias=bias)
        self.o_proj = nn.Linear(q_size, arch.hidden_size, bias=bias)
        self.scale = self.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,  # [T, 1, rotary_dim]
        sin: torch.Tensor,
        layer_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        q = apply_partial_rope(q, cos, sin, self.interleaved)
        k = apply_partial_rope(k, cos, sin, self.interleaved)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        write_kv(layer_cache, k, v, meta.slot_mapping)
        out = paged_attention(q, k, v, layer_cache, meta, self.scale)
        return self.o_proj(out.reshape(num_tokens, -1))


class FeedForward(nn.Module):
    def __init__(self, arch: GPTArch):
        super().__init__()
        self.fc_in = nn.Linear(arch.hidden_size, arch.intermediate_size)
        self.fc_out = nn.Linear(arch.intermediate_size, arch.hidden_size)
        self.act = ACTIVATIONS[arch.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class GPTForCausalLM(CausalLM):
    """A family sets `layer_cls` (built as `layer_cls(arch)`), whether its LM head has a
    bias, and its rotary pairing."""

    layer_cls: type[nn.Module]
    lm_head_bias: bool = False
    rope_interleaved: bool = False

    def __init__(self, arch: GPTArch, max_positions: int | None = None):
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(self.layer_cls(arch) for _ in range(arch.num_layers))
        self.norm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=self.lm_head_bias)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = self.rope_tables(arch, max_positions or arch.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @classmethod
    def rope_tables(cls, arch: GPTArch, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cache(arch, max_positions, arch.rotary_dim, cls.rope_interleaved)


def layer_norm_weights(
    hf: dict[str, torch.Tensor], hf_name: str, our_name: str
) -> dict[str, torch.Tensor]:
    return {
        f"{our_name}.weight": hf[f"{hf_name}.weight"],
        f"{our_name}.bias": hf[f"{hf_name}.bias"],
    }
