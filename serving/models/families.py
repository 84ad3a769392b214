"""Which model class runs a Hugging Face folder, by the `architectures` of its config.

A family is what differs between decoders (norms, residual layout, rotary variant, the
checkpoint's weight names); the paged attention, KV cache and engine are shared. Adding
one: a module beside `llama.py` with its config reader, model class (a `CausalLM`) and
name mapping, and a line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from serving.models import bloom, gpt_neox, gptj, qwen3
from serving.models.arch import SUPPORTED_ARCHITECTURES, LlamaArch
from serving.models.causal_lm import CausalLM
from serving.models.llama import LlamaForCausalLM, llama_state_dict


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    architectures: frozenset[str]
    arch_from_config: Callable[[dict], Any]  # config.json → the model's arch
    model_cls: type[CausalLM]  # built as model_cls(arch, max_positions=...)
    # checkpoint tensors → ours (renamed, q/k/v and gate/up fused); shares their storage
    state_dict: Callable[[dict[str, torch.Tensor], Any], dict[str, torch.Tensor]]


FAMILIES = (
    Family(
        "llama",
        SUPPORTED_ARCHITECTURES,
        LlamaArch.from_hf_config,
        LlamaForCausalLM,
        llama_state_dict,
    ),
    Family(
        "qwen3",
        qwen3.ARCHITECTURES,
        qwen3.arch_from_config,
        qwen3.Qwen3ForCausalLM,
        qwen3.qwen3_state_dict,
    ),
    Family(
        "gpt_neox",
        gpt_neox.ARCHITECTURES,
        gpt_neox.arch_from_config,
        gpt_neox.GPTNeoXForCausalLM,
        gpt_neox.gpt_neox_state_dict,
    ),
    Family(
        "gptj",
        gptj.ARCHITECTURES,
        gptj.arch_from_config,
        gptj.GPTJForCausalLM,
        gptj.gptj_state_dict,
    ),
    Family(
        "bloom",
        bloom.ARCHITECTURES,
        bloom.arch_from_config,
        bloom.BloomForCausalLM,
        bloom.bloom_state_dict,
    ),
)


def supported_architectures() -> list[str]:
    return sorted(a for family in FAMILIES for a in family.architectures)


def family_for(cfg: dict) -> Family:
    """The family of a parsed `config.json`; one without `architectures` is read as Llama."""
    archs = set(cfg.get("architectures") or ["LlamaForCausalLM"])
    for family in FAMILIES:
        if archs & family.architectures:
            return family
    raise ValueError(
        f"unsupported architecture {sorted(archs)}; supported: {supported_architectures()}"
    )
