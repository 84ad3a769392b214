"""BLOOM: no rotary embedding but ALiBi, a per-head linear bias on the attention scores
(`slope_h * (key_pos - query_pos)`, the slopes a geometric series over the heads); a
LayerNorm right after the word embedding; otherwise a sequential pre-LayerNorm decoder
with biases everywhere, a tanh-GELU MLP and an LM head tied to the embedding.

q/k/v are fused per head in the checkpoint as in GPT-NeoX, reordered the same way at
load. The attention and KV cache are the shared paged ones, given the slopes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from serving.models.arch import GPTArch, check_architecture, eos_token_ids
from serving.models.attention import AttentionMetadata, paged_attention, write_kv
from serving.models.gpt_layers import FeedForward, GPTForCausalLM, layer_norm_weights
from serving.models.gpt_neox import _heads_first

ARCHITECTURES = frozenset({"BloomForCausalLM"})


def arch_from_config(cfg: dict) -> GPTArch:
    check_architecture(cfg, ARCHITECTURES, "BloomForCausalLM")
    if cfg.get("apply_residual_connection_post_layernorm"):
        raise ValueError("BLOOM with apply_residual_connection_post_layernorm is not supported")
    hidden = cfg.get("hidden_size") or cfg["n_embed"]
    num_heads = cfg.get("n_head") or cfg["num_attention_heads"]
    return GPTArch(
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_layers=cfg.get("n_layer") or cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=hidden // num_heads,
        rotary_dim=0,
        rope_theta=0.0,
        rope_scaling=None,
        layer_norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        hidden_act="gelu_pytorch_tanh",  # bloom_gelu_forward: the tanh approximation
        attention_bias=True,
        parallel_residual=False,
        max_position_embeddings=cfg.get("seq_length") or 2048,  # ALiBi: no trained limit
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_token_ids(cfg),
    )


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """fp32 `[num_heads]`: 2^(-8i/n) for i = 1..n with n the largest power of two up to
    `num_heads`, then every other slope of the series for 2n (transformers' rule)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = [2 ** (-8 * i / closest) for i in range(1, closest + 1)]
    extra = [2 ** (-4 * i / closest) for i in range(1, 2 * (num_heads - closest), 2)]
    return torch.tensor(slopes + extra, dtype=torch.float32, device="cpu")


class NormedEmbedding(nn.Module):
    """The word embedding and the LayerNorm BLOOM applies to it, as one module: whoever
    embeds tokens (the model, speculative drafts) gets the normalised vectors."""

    def __init__(self, arch: GPTArch):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(arch.vocab_size, arch.hidden_size))
        self.norm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(F.embedding(input_ids, self.weight))


class AlibiAttention(nn.Module):
    def __init__(self, arch: GPTArch):
        super().__init__()
        self.num_heads, self.head_dim = arch.num_heads, arch.head_dim
        size = self.num_heads * self.head_dim
        self.qkv_proj = nn.Linear(arch.hidden_size, 3 * size)
        self.o_proj = nn.Linear(size, arch.hidden_size)
        self.scale = self.head_dim**-0.5
        # explicitly on the CPU and fp32: the model may be built on the meta device, and
        # slope * distance needs fp32 at long contexts
        self.register_buffer("alibi_slopes", alibi_slopes(self.num_heads), persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,  # unused: no rotary
        sin: torch.Tensor,
        layer_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x).view(num_tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=1)
        write_kv(layer_cache, k, v, meta.slot_mapping)
        out = paged_attention(q, k, v, layer_cache, meta, self.scale, self.alibi_slopes)
        return self.o_proj(out.reshape(num_tokens, -1))


class BloomLayer(nn.Module):
    def __init__(self, arch: GPTArch):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)
        self.self_attn = AlibiAttention(arch)
        self.post_attention_layernorm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)
        self.mlp = FeedForward(arch)

    def forward(self, x, cos, sin, layer_cache, meta) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class BloomForCausalLM(GPTForCausalLM):
    layer_cls = BloomLayer

    def __init__(self, arch: GPTArch, max_positions: int | None = None):
        super().__init__(arch, max_positions)
        self.embed_tokens = NormedEmbedding(arch)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @classmethod
    def rope_tables(cls, arch: GPTArch, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        empty = torch.zeros(max_positions, 0, device="cpu")  # no rotary: empty tables
        return empty, empty


def bloom_state_dict(hf: dict[str, torch.Tensor], arch: GPTArch) -> dict[str, torch.Tensor]:
    # BloomForCausalLM saves under "transformer."; the original bigscience checkpoints
    # (saved from BloomModel) have no prefix
    prefix = "transformer." if "transformer.word_embeddings.weight" in hf else ""
    out = {"embed_tokens.weight": hf[prefix + "word_embeddings.weight"]}
    out |= layer_norm_weights(hf, prefix + "word_embeddings_layernorm", "embed_tokens.norm")
    out |= layer_norm_weights(hf, prefix + "ln_f", "norm")
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = hf["lm_head.weight"]
    for i in range(arch.num_layers):
        p, q = f"{prefix}h.{i}.", f"layers.{i}."
        out |= layer_norm_weights(hf, p + "input_layernorm", q + "input_layernorm")
        out |= layer_norm_weights(
            hf, p + "post_attention_layernorm", q + "post_attention_layernorm"
        )
        qkv, dense = p + "self_attention.query_key_value.", p + "self_attention.dense."
        out[q + "self_attn.qkv_proj.weight"] = _heads_first(hf[qkv + "weight"], arch.num_heads)
        out[q + "self_attn.qkv_proj.bias"] = _heads_first(hf[qkv + "bias"], arch.num_heads)
        out[q + "self_attn.o_proj.weight"] = hf[dense + "weight"]
        out[q + "self_attn.o_proj.bias"] = hf[dense + "bias"]
        for hf_name, ours in (("dense_h_to_4h", "fc_in"), ("dense_4h_to_h", "fc_out")):
            out[q + f"mlp.{ours}.weight"] = hf[p + f"mlp.{hf_name}.weight"]
            out[q + f"mlp.{ours}.bias"] = hf[p + f"mlp.{hf_name}.bias"]
    return out
