"""Architecture hyper-parameters of a model, read from a HF `config.json`: `LlamaArch` for
the Llama-shaped families (RMSNorm, gated MLP, full rotary), `GPTArch` for the GPT-style
ones (LayerNorm, biased MLP, partial rotary or ALiBi, parallel residual or not).

The engine reads only the fields both share: `num_layers`, `num_kv_heads`, `head_dim`
(the KV pool), `vocab_size`, `hidden_size`, `max_position_embeddings`,
`tie_word_embeddings` and the special token ids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# The architectures `LlamaForCausalLM` runs as it is (and the ONNX export and the vLLM
# hand-over, which rebuild its graph); other families register in `families.py`.
SUPPORTED_ARCHITECTURES = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
    }
)


def eos_token_ids(cfg: dict) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())


def check_architecture(cfg: dict, supported: frozenset[str], default: str) -> set[str]:
    archs = set(cfg.get("architectures") or [default])
    if not archs & supported:
        raise ValueError(
            f"unsupported architecture {sorted(archs)}; supported: {sorted(supported)}"
        )
    return archs


@dataclass(frozen=True, slots=True)
class LlamaArch:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 has biases on q/k/v projections
    rope_scaling: dict | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_hf_config(
        cls, cfg: dict, supported: frozenset[str] = SUPPORTED_ARCHITECTURES
    ) -> LlamaArch:
        archs = check_architecture(cfg, supported, "LlamaForCausalLM")
        num_heads = cfg["num_attention_heads"]
        rope_params = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads", num_heads),
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias="Qwen2ForCausalLM" in archs or bool(cfg.get("attention_bias", False)),
            rope_scaling=rope_scaling,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_token_ids(cfg),
        )

    @classmethod
    def from_folder(cls, folder: Path) -> LlamaArch:
        return cls.from_hf_config(json.loads((Path(folder) / "config.json").read_text()))


@dataclass(frozen=True, slots=True)
class GPTArch:
    """GPT-NeoX, GPT-J and BLOOM: LayerNorm with bias, a biased GELU MLP, rotary on the
    first `rotary_dim` channels of each head (BLOOM: 0, ALiBi instead), attention and MLP
    side by side when `parallel_residual`. Each family's module reads its own config keys
    into this."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float
    rope_scaling: dict | None
    layer_norm_eps: float
    hidden_act: str
    attention_bias: bool  # q/k/v and output projections
    parallel_residual: bool
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
