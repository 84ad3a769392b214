"""Compact Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) over a paged KV cache.

Tokens arrive flattened (`[num_tokens]`, sequences back to back) as in vLLM; q/k/v and
gate/up projections are fused into one matmul each to keep the number of kernel
launches (which dominate a 135M model on CPU) low. On the CPU the small ops between the
matmuls (norms, residual adds, rotary, the KV write, SiLU) run as four fused C++ ops per
layer (`serving.kernels.fused_ops`, same rounding) instead of ~25 eager ones.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from serving.kernels import fused_ops
from serving.models.arch import LlamaArch
from serving.models.attention import AttentionMetadata, paged_attention, write_kv
from serving.models.causal_lm import CausalLM
from serving.models.rope import apply_rope, rope_cache

# INFEROS_FUSED_OPS=0 keeps the eager ops (to measure what the fused ones change).
FUSED_OPS = os.environ.get("INFEROS_FUSED_OPS", "1") != "0"


def fused(x: torch.Tensor) -> bool:
    """Whether the fused C++ ops take `x`: a flat `[tokens, features]` CPU batch in fp32 or
    bf16, outside tracing (the ONNX export runs these modules on `[B, T, ...]` batches),
    where the kernel built."""
    return (
        FUSED_OPS
        and x.dim() == 2
        and x.is_contiguous()
        and x.device.type == "cpu"
        and x.dtype in fused_ops.DTYPES
        and not torch.jit.is_tracing()
        and fused_ops.kernel_available()
    )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as transformers does, then scale in the weights' dtype.
        if fused(x) and self.weight.dtype == x.dtype:
            return fused_ops.rms_norm(x, self.weight, self.eps)
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, arch: LlamaArch):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            arch.num_heads,
            arch.num_kv_heads,
            arch.head_dim,
        )
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = nn.Linear(arch.hidden_size, q_size + 2 * kv_size, bias=arch.qkv_bias)
        self.o_proj = nn.Linear(q_size, arch.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5

    # whether `position_qk` is plain rotary, which the fused rope_qkv_write kernel computes
    fused_rope: bool = True

    def position_qk(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q `[T, H, D]` and k `[T, Hkv, D]` as attention sees them: rotated (a family may
        normalise them first, and then sets `fused_rope = False`)."""
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        if (
            self.fused_rope
            and fused(qkv)
            and layer_cache.dtype in fused_ops.DTYPES
            and cos.dtype == qkv.dtype
        ):
            q, k, v = fused_ops.rope_qkv_write(
                qkv, cos, sin, layer_cache, meta.slot_mapping, self.num_heads, self.num_kv_heads
            )
        else:
            q, k, v = qkv.split(self.split_sizes, dim=-1)
            q, k = self.position_qk(
                q.view(num_tokens, self.num_heads, self.head_dim),
                k.view(num_tokens, self.num_kv_heads, self.head_dim),
                cos,
                sin,
            )
            v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
            write_kv(layer_cache, k, v, meta.slot_mapping)
        out = paged_attention(q, k, v, layer_cache, meta, self.scale)
        return self.o_proj(out.reshape(num_tokens, -1))


class MLP(nn.Module):
    def __init__(self, arch: LlamaArch):
        super().__init__()
        self.intermediate_size = arch.intermediate_size
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if fused(gate_up):
            return self.down_proj(fused_ops.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    attention_cls: type[Attention] = Attention  # a family's variant (qwen3: q/k norm)

    def __init__(self, arch: LlamaArch):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = self.attention_cls(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = MLP(arch)

    def forward(self, x, cos, sin, layer_cache, meta) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin, layer_cache, meta)
        norm = self.post_attention_layernorm
        if fused(x) and attn.dtype == x.dtype == norm.weight.dtype and attn.is_contiguous():
            h, x = fused_ops.add_rms_norm(attn, x, norm.weight, norm.eps)  # x + attn, normed
        else:
            x = x + attn
            h = norm(x)
        return x + self.mlp(h)


class LlamaForCausalLM(CausalLM):
    layer_cls: type[DecoderLayer] = DecoderLayer

    def __init__(self, arch: LlamaArch, max_positions: int | None = None):
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(self.layer_cls(arch) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_cache(arch, max_positions or arch.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)


def llama_state_dict(hf: dict[str, torch.Tensor], arch: LlamaArch) -> dict[str, torch.Tensor]:
    """Rename HF keys to ours and concatenate q/k/v and gate/up weights."""
    out: dict[str, torch.Tensor] = {
        "embed_tokens.weight": hf["model.embed_tokens.weight"],
        "norm.weight": hf["model.norm.weight"],
    }
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = hf["lm_head.weight"]
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        q = f"layers.{i}."
        attn = p + "self_attn."
        out[q + "self_attn.qkv_proj.weight"] = torch.cat(
            [hf[attn + f"{n}_proj.weight"] for n in "qkv"], dim=0
        )
        if arch.qkv_bias:
            out[q + "self_attn.qkv_proj.bias"] = torch.cat(
                [hf[attn + f"{n}_proj.bias"] for n in "qkv"], dim=0
            )
        out[q + "self_attn.o_proj.weight"] = hf[attn + "o_proj.weight"]
        out[q + "mlp.gate_up_proj.weight"] = torch.cat(
            [hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]], dim=0
        )
        out[q + "mlp.down_proj.weight"] = hf[p + "mlp.down_proj.weight"]
        out[q + "input_layernorm.weight"] = hf[p + "input_layernorm.weight"]
        out[q + "post_attention_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
    return out
