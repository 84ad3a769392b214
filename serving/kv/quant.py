"""Asymmetric int8/int4 quantization of KV blocks (levels L1 and L2 of the staged KV cache).

A block is `[num_layers, 2, block_size, num_kv_heads, head_dim]` (K at index 0 of dim 1, V at
1), see `block_format`. Grouping follows KIVI: keys have outlier *channels*, so each
(layer, head, channel) gets its own scale/zero over the block's tokens; values have no
channel structure but attention mixes them per token, so each (layer, token, head) gets its
own scale/zero over head_dim. Codes satisfy x ≈ q * scale + zero with q in [0, 2^bits - 1],
so the round-trip error of every element is at most scale / 2 of its group.

Pure tensor kernels, no engine state: the policy decides *when*, this module only *how*.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_KEY_TOKEN_DIM = 1  # in a K half [L, bs, H, D]: reduce over tokens -> one group per channel
_VALUE_CHANNEL_DIM = -1  # in a V half [L, bs, H, D]: reduce over head_dim -> one group per token


@dataclass(frozen=True, eq=False)
class QuantizedBlock:
    """One KV block at L1 (bits=8) or L2 (bits=4).

    `k_codes`/`v_codes` are uint8 `[L, bs, H, D]` for 8 bits, `[L, bs, H, D // 2]` for 4 bits
    (two codes per byte along head_dim). Scales/zeros are float32: keys `[L, 1, H, D]`
    (per channel), values `[L, bs, H, 1]` (per token).
    """

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    bits: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def num_bytes(self) -> int:
        """Bytes actually held: codes plus float32 scales and zeros (no metadata)."""
        parts = (self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero)
        return sum(t.numel() * t.element_size() for t in parts)

    @property
    def original_num_bytes(self) -> int:
        """Bytes of the block at L0, for compression ratios."""
        numel = torch.Size(self.shape).numel()
        return numel * torch.tensor([], dtype=self.dtype).element_size()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte along the last dim; the even index goes in the low nibble.

    `q` is an integer tensor with values in [0, 15] and an even last dim; returns uint8
    `[..., n // 2]`. Raises on out-of-range codes, which would silently corrupt a neighbour.
    """
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dim, got {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("int4 codes must lie in [0, 15]")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)  # [..., n // 2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 `[..., m]` -> uint8 codes `[..., 2 * m]`."""
    packed = packed.to(torch.uint8)
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)  # [..., m, 2] -> [..., 2 * m]


def _quantize_groups(
    x: torch.Tensor, dim: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min/max asymmetric quantization of float32 `x` with one group per slice along `dim`.

    A constant group gets scale 0 and zero = its value, so it round-trips exactly; the
    division uses a safe divisor instead, which keeps NaN/inf out of the codes.
    """
    qmax = (1 << bits) - 1
    lo = x.amin(dim=dim, keepdim=True)  # group shape: `x.shape` with `dim` reduced to 1
    hi = x.amax(dim=dim, keepdim=True)
    scale = (hi - lo) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((x - lo) / safe).clamp_(0, qmax).to(torch.uint8)  # same shape as x
    return codes, scale, lo


def quantize_block(block: torch.Tensor, bits: int) -> QuantizedBlock:
    """Quantize a KV block to 8 (L1) or 4 (L2) bits with KIVI grouping; see the module doc."""
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    if block.dim() != 5 or block.shape[1] != 2:
        raise ValueError(f"expected [L, 2, bs, H, D], got {tuple(block.shape)}")
    if bits == 4 and block.shape[-1] % 2:
        raise ValueError("int4 needs an even head_dim")
    x = block.detach().to(torch.float32)  # bf16 -> fp32 is exact, so scales see true values
    k_codes, k_scale, k_zero = _quantize_groups(x[:, 0], _KEY_TOKEN_DIM, bits)
    v_codes, v_scale, v_zero = _quantize_groups(x[:, 1], _VALUE_CHANNEL_DIM, bits)
    if bits == 4:
        k_codes, v_codes = pack_int4(k_codes), pack_int4(v_codes)  # [L, bs, H, D // 2]
    return QuantizedBlock(
        k_codes=k_codes.contiguous(),
        k_scale=k_scale.contiguous(),
        k_zero=k_zero.contiguous(),
        v_codes=v_codes.contiguous(),
        v_scale=v_scale.contiguous(),
        v_zero=v_zero.contiguous(),
        bits=bits,
        shape=tuple(block.shape),
        dtype=block.dtype,
    )


def dequantize_block(qb: QuantizedBlock, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rebuild `[L, 2, bs, H, D]` in the original dtype (or `dtype`, e.g. float32 to check
    the pure quantization error without the final rounding to bf16)."""
    k_codes, v_codes = qb.k_codes, qb.v_codes
    if qb.bits == 4:
        k_codes, v_codes = unpack_int4(k_codes), unpack_int4(v_codes)  # [L, bs, H, D]
    k = k_codes.to(torch.float32) * qb.k_scale + qb.k_zero  # [L, bs, H, D]
    v = v_codes.to(torch.float32) * qb.v_scale + qb.v_zero  # [L, bs, H, D]
    out = torch.stack((k, v), dim=1)  # [L, 2, bs, H, D]
    return out.to(qb.dtype if dtype is None else dtype)


def error_bound(qb: QuantizedBlock, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-element bound on |dequantize_block(qb, dtype) - block|, shape `qb.shape`, float32.

    scale / 2 from rounding to the grid, plus float slack: one float32 ulp of the group's
    magnitude for the fp32 arithmetic, and one ulp of the output dtype (bf16: 2^-7 relative)
    for the final cast.
    """
    out_dtype = qb.dtype if dtype is None else dtype
    eps = torch.finfo(torch.float32).eps + torch.finfo(out_dtype).eps
    qmax = (1 << qb.bits) - 1

    def half(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        magnitude = torch.maximum(zero.abs(), (zero + qmax * scale).abs())
        return (scale / 2 + eps * magnitude).expand(*qb.shape[:1], *qb.shape[2:])

    return torch.stack((half(qb.k_scale, qb.k_zero), half(qb.v_scale, qb.v_zero)), dim=1)
