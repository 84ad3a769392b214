"""Qwen3: a Llama whose queries and keys are RMS-normalised per head (one weight of
`head_dim` each for q and k, shared by all heads) before the rotary embedding.

`attention_bias` puts biases on all four attention projections (Qwen2 had them on q/k/v
only, without a config switch).
"""

from __future__ import annotations

import torch
from torch import nn

from serving.models.arch import LlamaArch
from serving.models.llama import Attention, DecoderLayer, LlamaForCausalLM, RMSNorm
from serving.models.llama import llama_state_dict as _llama_state_dict

ARCHITECTURES = frozenset({"Qwen3ForCausalLM"})


def arch_from_config(cfg: dict) -> LlamaArch:
    if cfg.get("use_sliding_window"):
        raise ValueError(
            "Qwen3 with use_sliding_window=true is not supported: the paged attention "
            "attends to the whole context"
        )
    return LlamaArch.from_hf_config(cfg, ARCHITECTURES)


class Qwen3Attention(Attention):
    fused_rope = False  # the norm comes before the rotary: the fused kernel has none

    def __init__(self, arch: LlamaArch):
        super().__init__(arch)
        self.o_proj = nn.Linear(
            self.num_heads * self.head_dim, arch.hidden_size, bias=arch.qkv_bias
        )
        self.q_norm = RMSNorm(self.head_dim, arch.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, arch.rms_norm_eps)

    def position_qk(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return super().position_qk(self.q_norm(q), self.k_norm(k), cos, sin)


class Qwen3DecoderLayer(DecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3DecoderLayer


def qwen3_state_dict(hf: dict[str, torch.Tensor], arch: LlamaArch) -> dict[str, torch.Tensor]:
    """Llama's names, plus the q/k norms and the output projection's bias."""
    out = _llama_state_dict(hf, arch)
    for i in range(arch.num_layers):
        attn = f"model.layers.{i}.self_attn."
        ours = f"layers.{i}.self_attn."
        out[ours + "q_norm.weight"] = hf[attn + "q_norm.weight"]
        out[ours + "k_norm.weight"] = hf[attn + "k_norm.weight"]
        if arch.qkv_bias:
            out[ours + "o_proj.bias"] = hf[attn + "o_proj.bias"]
    return out
