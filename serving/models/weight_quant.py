"""Weight-only quantizers for `model.weights` (pure tensor functions, no modules).

- int8: symmetric, one fp32 scale per output channel (`w ≈ codes * scale[n]`). Per channel
  is enough at 8 bits (each row's outliers cost at most half a step of 1/254 of its range)
  and lets the int8 kernel read one scale per row's group without a second grid.
- int4: asymmetric, one (scale, zero) per `group_size` inputs of each output channel, in
  the layout of torch's `_weight_int4pack_mm_for_cpu` (the kernel `int4.py` already runs
  for GGUF Q4_1 weights): it computes `(q - 8) * scale + zero` with bf16 scales and zeros,
  so the codes are chosen against the bf16-rounded parameters the kernel will really use.
"""

from __future__ import annotations

import torch


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(codes [N, K] int8 in -127..127, scales [N] fp32)`: `codes * scales[:, None]` is
    within `scales / 2` of `weight` everywhere (an all-zero row gets scale 0)."""
    w = weight.float()
    scales = w.abs().amax(dim=1) / 127
    codes = torch.round(w / scales.clamp(min=1e-30)[:, None]).clamp(-127, 127)
    return codes.to(torch.int8), scales.contiguous()


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return codes.float() * scales[:, None]


def bf16_at_least(x: torch.Tensor) -> torch.Tensor:
    """`x` (>= 0) rounded to a bf16 value no smaller than it: a scale rounded down would
    leave the group's maximum beyond code 15 and clip it."""
    rounded = x.to(torch.bfloat16)
    return torch.where(rounded.float() < x, torch.nextafter(rounded, rounded + 1), rounded)


def quantize_int4_groups(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(q [N, K] int32 in 0..15, scales_and_zeros [K/g, N, 2] bf16)` for torch's int4 CPU
    kernel: the group's min..max split in 15 steps (min-max, asymmetric: a group's weights
    are rarely centred on 0). Dequantized (`dequantize_int4`) each weight is within about
    half a step of `weight`, plus the bf16 rounding of its group's zero."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
    g = weight.float().view(n, k // group_size, group_size)
    scale, zero = int4_group_params(g)
    scale, zero = scale[..., None], zero[..., None]
    q = torch.round((g - zero) / scale.clamp(min=1e-30) + 8).clamp(0, 15)
    scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return q.view(n, k).to(torch.int32), scales_and_zeros.to(torch.bfloat16)


def int4_group_params(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(scale, zero)` (fp32 holding bf16 values) of each group along the last dim: its
    min..max in 15 steps, code 8 at `zero`, as torch's int4 kernel dequantizes."""
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = bf16_at_least((hi - lo) / 15).float()
    zero = (lo + 8 * scale).to(torch.bfloat16).float()
    return scale, zero


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The fp32 weight `[N, K]` the int4 kernel multiplies by."""
    n, k = q.shape
    groups = scales_and_zeros.shape[0]
    sz = scales_and_zeros.float().transpose(0, 1)  # [N, K/g, 2]
    deq = (q.float().view(n, groups, k // groups) - 8) * sz[..., :1] + sz[..., 1:]
    return deq.view(n, k)
