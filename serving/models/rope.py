"""Rotary position embeddings (HF "rotate_half" convention), with Llama-3 frequency scaling."""

from __future__ import annotations

import math

import torch

from serving.models.arch import LlamaArch


def _inv_freq(arch: LlamaArch) -> torch.Tensor:
    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = arch.rope_scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        # Same piecewise rule as transformers' _compute_llama3_parameters.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = torch.where(is_mid, mid, scaled)
    elif rope_type != "default":
        raise ValueError(f"rope scaling {rope_type!r} is not supported (default, linear, llama3)")
    return inv_freq.float()


def rope_cache(arch: LlamaArch, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each `[max_positions, head_dim]`."""
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, _inv_freq(arch))  # [P, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [P, D]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[num_tokens, heads, head_dim]`; cos/sin `[num_tokens, 1, head_dim]`."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
