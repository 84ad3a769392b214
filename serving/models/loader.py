"""Load a local Hugging Face folder (safetensors) into our `LlamaForCausalLM`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from serving.models.arch import LlamaArch
from serving.models.dense_kernels import use_measured_dense
from serving.models.int4 import repack_int4, use_measured_int4
from serving.models.llama import LlamaForCausalLM
from serving.models.q8_head import use_q8_head
from serving.models.rope import rope_cache

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype {name!r} not supported; choose one of {sorted(_DTYPES)}") from None


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(folder.glob("*.safetensors"))]
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(folder / name)))
    return state


def _fused_state_dict(hf: dict[str, torch.Tensor], arch: LlamaArch) -> dict[str, torch.Tensor]:
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


def load_model(
    folder: Path,
    dtype: torch.dtype = torch.float32,
    max_positions: int | None = None,
    int4_max_tokens: int = 0,
    measured_dense: bool = False,
) -> LlamaForCausalLM:
    """`int4_max_tokens > 0`: steps of up to that many tokens run on a lossless 4-bit
    repack (bf16 activations) of the linear layers whose weights came from a 4-bit GGUF,
    and an LM head that came from a Q8_0 tensor samples few rows from its int8 codes
    (`q8_head`, exact weights, fp32 sums).
    `measured_dense`: plain linear layers switch between bf16 and fp32 at the batch size
    from which this machine runs fp32 faster (`dense_kernels`, measured once per machine).
    Neither (the default) keeps `dtype` everywhere: the reference numerics."""
    folder = Path(folder)
    arch = LlamaArch.from_folder(folder)
    with torch.device("meta"):
        model = LlamaForCausalLM(arch, max_positions=max_positions)
    source = _fused_state_dict(_read_state_dict(folder), arch)
    state = {k: v.to(dtype) for k, v in source.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if arch.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # Buffers were created on the meta device; rebuild them for real.
    cos, sin = rope_cache(arch, max_positions or arch.max_position_embeddings)
    model.rope_cos, model.rope_sin = cos, sin
    if int4_max_tokens > 0 and dtype in (torch.bfloat16, torch.float32):
        repack_int4(model, source, int4_max_tokens)
    if arch.tie_word_embeddings:  # the head as loaded: the embedding
        source["lm_head.weight"] = source["embed_tokens.weight"]
    if measured_dense:
        use_measured_dense(model, source)
    if int4_max_tokens > 0 and measured_dense:
        use_measured_int4(model, dtype, int4_max_tokens)
    if int4_max_tokens > 0 and "lm_head.weight" in source:
        use_q8_head(model, source["lm_head.weight"], dtype)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"weights missing from {folder}: {missing[:5]}")
    logger.info("loaded %s (%d layers, %s)", folder.name, arch.num_layers, dtype)
    return model.eval()
