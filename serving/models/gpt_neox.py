"""GPT-NeoX (Pythia, GPT-NeoX-20B, StableLM-alpha): LayerNorm with bias, rotary on the
first `rotary_pct` of each head's channels (rotate-half pairing), biases everywhere, and
by default the parallel residual `x + attn(ln1(x)) + mlp(ln2(x))`
(`use_parallel_residual: false`: the sequential one, as Llama).

The checkpoint fuses q/k/v per head (`query_key_value` rows are q, k, v of head 0, then
of head 1, ...); loading reorders them to q of all heads, then k, then v, so the shared
`RotaryAttention` splits them as Llama's `qkv_proj`.
"""

from __future__ import annotations

import torch
from torch import nn

from serving.models.arch import GPTArch, check_architecture, eos_token_ids
from serving.models.attention import AttentionMetadata
from serving.models.gpt_layers import (
    FeedForward,
    GPTForCausalLM,
    RotaryAttention,
    check_activation,
    layer_norm_weights,
)

ARCHITECTURES = frozenset({"GPTNeoXForCausalLM"})


def _get(cfg: dict, *keys: str, default=None):
    """The first of `keys` that `cfg` sets (not None): checkpoints spell a setting either
    the original way (`rotary_pct`) or transformers 5's (`rope_parameters`)."""
    rope_params = cfg.get("rope_parameters") or {}
    for key in keys:
        for source in (cfg, rope_params):
            if source.get(key) is not None:
                return source[key]
    return default


def arch_from_config(cfg: dict) -> GPTArch:
    check_architecture(cfg, ARCHITECTURES, "GPTNeoXForCausalLM")
    hidden, num_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = hidden // num_heads
    rotary_pct = float(_get(cfg, "rotary_pct", "partial_rotary_factor", default=0.25))
    rope_params = cfg.get("rope_parameters") or {}
    rope_scaling = cfg.get("rope_scaling")
    if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
        rope_scaling = rope_params
    return GPTArch(
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg.get("intermediate_size") or 4 * hidden,
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=head_dim,
        rotary_dim=int(head_dim * rotary_pct),
        rope_theta=float(_get(cfg, "rotary_emb_base", "rope_theta", default=10000.0)),
        rope_scaling=rope_scaling,
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
        hidden_act=check_activation(cfg.get("hidden_act", "gelu")),
        attention_bias=bool(cfg.get("attention_bias", True)),
        parallel_residual=bool(cfg.get("use_parallel_residual", True)),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_token_ids(cfg),
    )


class GPTNeoXLayer(nn.Module):
    def __init__(self, arch: GPTArch):
        super().__init__()
        self.parallel_residual = arch.parallel_residual
        self.input_layernorm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)
        self.self_attn = RotaryAttention(arch, interleaved=False)
        self.post_attention_layernorm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)
        self.mlp = FeedForward(arch)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), cos, sin, layer_cache, meta)
        if self.parallel_residual:
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class GPTNeoXForCausalLM(GPTForCausalLM):
    layer_cls = GPTNeoXLayer


def _heads_first(fused: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`query_key_value` rows (or bias) per head [q_h; k_h; v_h] → [q; k; v] over heads."""
    per_head = fused.view(num_heads, 3, -1, *fused.shape[1:])  # [H, 3, D, (in)]
    return per_head.transpose(0, 1).reshape(fused.shape)


def gpt_neox_state_dict(hf: dict[str, torch.Tensor], arch: GPTArch) -> dict[str, torch.Tensor]:
    out = {"embed_tokens.weight": hf["gpt_neox.embed_in.weight"]}
    out |= layer_norm_weights(hf, "gpt_neox.final_layer_norm", "norm")
    if not arch.tie_word_embeddings:
        # checkpoints name the head embed_out; transformers 5 modules call it lm_head
        out["lm_head.weight"] = hf[
            "embed_out.weight" if "embed_out.weight" in hf else "lm_head.weight"
        ]
    for i in range(arch.num_layers):
        p, q = f"gpt_neox.layers.{i}.", f"layers.{i}."
        out |= layer_norm_weights(hf, p + "input_layernorm", q + "input_layernorm")
        out |= layer_norm_weights(
            hf, p + "post_attention_layernorm", q + "post_attention_layernorm"
        )
        qkv, dense = p + "attention.query_key_value.", p + "attention.dense."
        out[q + "self_attn.qkv_proj.weight"] = _heads_first(hf[qkv + "weight"], arch.num_heads)
        out[q + "self_attn.o_proj.weight"] = hf[dense + "weight"]
        if arch.attention_bias:
            out[q + "self_attn.qkv_proj.bias"] = _heads_first(hf[qkv + "bias"], arch.num_heads)
            out[q + "self_attn.o_proj.bias"] = hf[dense + "bias"]
        for hf_name, ours in (("dense_h_to_4h", "fc_in"), ("dense_4h_to_h", "fc_out")):
            out[q + f"mlp.{ours}.weight"] = hf[p + f"mlp.{hf_name}.weight"]
            out[q + f"mlp.{ours}.bias"] = hf[p + f"mlp.{hf_name}.bias"]
    return out
