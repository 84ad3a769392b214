"""GPT-J: one LayerNorm feeding attention and MLP side by side,
`x + attn(ln(x)) + mlp(ln(x))`; rotary on the first `rotary_dim` channels of each head
with GPT-J's "rotate every two" pairing (base 10000); no attention biases; an LM head
with a bias.
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

ARCHITECTURES = frozenset({"GPTJForCausalLM"})


def arch_from_config(cfg: dict) -> GPTArch:
    check_architecture(cfg, ARCHITECTURES, "GPTJForCausalLM")
    hidden = cfg.get("n_embd") or cfg["hidden_size"]
    num_heads = cfg.get("n_head") or cfg["num_attention_heads"]
    head_dim = hidden // num_heads
    return GPTArch(
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg.get("n_inner") or 4 * hidden,
        num_layers=cfg.get("n_layer") or cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=head_dim,
        rotary_dim=cfg.get("rotary_dim") or head_dim,
        rope_theta=10000.0,
        rope_scaling=None,
        layer_norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        hidden_act=check_activation(cfg.get("activation_function", "gelu_new")),
        attention_bias=False,
        parallel_residual=True,
        max_position_embeddings=cfg.get("n_positions") or cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_token_ids(cfg),
    )


class GPTJLayer(nn.Module):
    def __init__(self, arch: GPTArch):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)
        self.self_attn = RotaryAttention(arch, interleaved=True)
        self.mlp = FeedForward(arch)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        h = self.input_layernorm(x)
        return x + self.self_attn(h, cos, sin, layer_cache, meta) + self.mlp(h)


class GPTJForCausalLM(GPTForCausalLM):
    layer_cls = GPTJLayer
    lm_head_bias = True
    rope_interleaved = True


def gptj_state_dict(hf: dict[str, torch.Tensor], arch: GPTArch) -> dict[str, torch.Tensor]:
    out = {"embed_tokens.weight": hf["transformer.wte.weight"], "lm_head.bias": hf["lm_head.bias"]}
    out |= layer_norm_weights(hf, "transformer.ln_f", "norm")
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = hf["lm_head.weight"]
    for i in range(arch.num_layers):
        p, q = f"transformer.h.{i}.", f"layers.{i}."
        out |= layer_norm_weights(hf, p + "ln_1", q + "input_layernorm")
        out[q + "self_attn.qkv_proj.weight"] = torch.cat(
            [hf[p + f"attn.{n}_proj.weight"] for n in "qkv"], dim=0
        )
        out[q + "self_attn.o_proj.weight"] = hf[p + "attn.out_proj.weight"]
        for name in ("fc_in", "fc_out"):
            out[q + f"mlp.{name}.weight"] = hf[p + f"mlp.{name}.weight"]
            out[q + f"mlp.{name}.bias"] = hf[p + f"mlp.{name}.bias"]
    return out
