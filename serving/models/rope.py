"""Rotary position embeddings, with Llama-3 frequency scaling.

Two conventions pair a head's channels: HF's "rotate_half" (Llama, NeoX: channel i with
i + D/2) and GPT-J's "rotate every two" (channel 2i with 2i + 1, `interleaved`). Families
that rotate only the first `rotary_dim` channels of a head pass tables of that width to
`apply_partial_rope`, which leaves the rest as they are."""

from __future__ import annotations

import math

import torch

from serving.models.arch import GPTArch, LlamaArch


def _inv_freq(arch: LlamaArch | GPTArch, dim: int | None = None) -> torch.Tensor:
    dim = dim or arch.head_dim
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


def rope_cache(
    arch: LlamaArch | GPTArch, max_positions: int, dim: int | None = None, interleaved: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each `[max_positions, dim]` (`dim`: the rotated channels of a
    head, all of them by default), laid out for `apply_rope` or, `interleaved`, for
    `apply_rope_interleaved`."""
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, _inv_freq(arch, dim))  # [P, D/2]
    if interleaved:
        emb = freqs.repeat_interleave(2, dim=-1)  # [P, D]: f0 f0 f1 f1 ...
    else:
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, D]: f0 f1 ... f0 f1 ...
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[num_tokens, heads, head_dim]`; cos/sin `[num_tokens, 1, head_dim]`."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """GPT-J's "rotate every two": channels (2i, 2i + 1) form pair i; tables from
    `rope_cache(..., interleaved=True)`."""
    rotated = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


def apply_partial_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False
) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` channels of each head of `x [T, H, D]` and pass
    the others through (NeoX's `rotary_pct`, GPT-J's `rotary_dim`)."""
    rotate = apply_rope_interleaved if interleaved else apply_rope
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return rotate(x, cos, sin)
    return torch.cat([rotate(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]], dim=-1)
