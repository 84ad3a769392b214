"""Group-wise asymmetric INT8/INT4 quantization of KV units (levels L1 and L2 of the staged KV).

A unit is `[num_layers, 2, T, num_kv_heads, head_dim]` (K at index 0 of dim 1, V at 1, see
`block_format`) for any token count T: one 16-token block, or several consecutive blocks
that the engine quantizes together. Grouping follows KIVI: keys have outlier *channels*, so
each (layer, head, channel) gets its own scale/zero over the unit's T tokens; values have no
channel structure but attention mixes them per token, so each (layer, token, head) gets its
own scale/zero over head_dim (`value_group="head"`), or each (layer, token) one over all
heads (`"token"`: a third of the overhead, coarser).

Scales and zeros are float16: 4 bytes per group. Key groups span the unit's tokens, so the
overhead per key element is 4 / T bytes (0.25 at T = 16, which is why INT8 cannot reach a
1.9x reduction with single 16-token blocks; 0.03 at T = 128). The zero is rounded *down* and
the scale *up* to float16, so every value stays on the grid and the round-trip error of an
element is at most scale / 2 of its group (see `error_bound`). Codes satisfy
x ~= q * scale + zero with q in [0, 2^bits - 1]; INT4 packs two codes per byte.

Pure tensor kernels, no engine state: the policy decides *when*, this module only *how*.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ValueGroup = Literal["head", "token"]
# Value grouping per value bit width (the measured recipe, see README "Evaluate KV quality").
DEFAULT_VALUE_GROUP: dict[int, ValueGroup] = {8: "token", 4: "head", 2: "head"}
SCALE_DTYPE = torch.float16
_TOKEN_DIM = 1  # in a K or V half [L, T, H, D]


@dataclass(frozen=True, eq=False)
class QuantizedBlock:
    """One KV unit at L1 (bits=8) or L2 (bits=4).

    `k_codes`/`v_codes` are uint8 `[L, T, H, D]` for 8 bits, `[L, T, H, D // 2]` for 4 bits
    (two codes per byte along head_dim). Scales/zeros are float16: keys `[L, 1, H, D]` (per
    channel), values `[L, T, H, 1]` (per token and head) or `[L, T, 1, 1]` (per token).
    """

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    bits: int  # of the keys; the level's bits
    shape: tuple[int, ...]
    dtype: torch.dtype
    value_bits: int | None = None  # None: same as `bits`

    @property
    def v_bits(self) -> int:
        return self.bits if self.value_bits is None else self.value_bits

    @property
    def num_bytes(self) -> int:
        """Bytes actually held: codes plus scales and zeros (no Python metadata)."""
        parts = (self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero)
        return sum(t.numel() * t.element_size() for t in parts)

    @property
    def original_num_bytes(self) -> int:
        """Bytes of the unit at L0, for compression ratios."""
        numel = torch.Size(self.shape).numel()
        return numel * torch.tensor([], dtype=self.dtype).element_size()


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack `bits`-bit codes (4 or 2) `8 // bits` per byte along the last dim; code i of a
    byte sits at bit offset `i * bits` (for INT4: the even index in the low nibble).

    `q` is an integer tensor with values in [0, 2^bits - 1] and a last dim divisible by
    `8 // bits`; returns uint8 `[..., n * bits // 8]`. Raises on out-of-range codes, which
    would silently corrupt a neighbour.
    """
    per_byte = 8 // bits
    if q.shape[-1] % per_byte:
        raise ValueError(f"int{bits} packing needs a last dim divisible by {per_byte}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > (1 << bits) - 1):
        raise ValueError(f"int{bits} codes must lie in [0, {(1 << bits) - 1}]")
    q = q.to(torch.uint8).unflatten(-1, (-1, per_byte))  # [..., n // per_byte, per_byte]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)  # [per_byte]
    return (q << shifts).sum(dim=-1, dtype=torch.uint8)  # disjoint bits: sum == or


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 `[..., m]` -> uint8 codes `[..., m * 8 // bits]`."""
    # scalar shifts: a broadcast tensor shift is an order of magnitude slower on CPU
    packed, mask = packed.to(torch.uint8), (1 << bits) - 1
    parts = [(packed >> shift) & mask for shift in range(0, 8, bits)]
    return torch.stack(parts, dim=-1).flatten(-2)  # [..., m, per_byte] -> [..., m * per_byte]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the even index in the low nibble (see `pack_codes`)."""
    return pack_codes(q, 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return unpack_codes(packed, 4)


def _down(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the largest float16 <= x (round toward -inf)."""
    h = x.to(SCALE_DTYPE)
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, -torch.inf)), h)


def _up(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the smallest float16 >= x (round toward +inf)."""
    h = x.to(SCALE_DTYPE)
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, torch.inf)), h)


def _quantize_groups(
    x: torch.Tensor, dims: tuple[int, ...], bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min/max asymmetric quantization of float32 `x`, one group per slice reduced over `dims`.

    zero <= min and zero + qmax * scale >= max in float16, so no code is clamped by more than
    float32 rounding. A constant group gets scale 0 and zero = its value (exact when that
    value is a float16); the division uses a safe divisor, which keeps NaN/inf out of codes.
    """
    qmax = (1 << bits) - 1
    lo = x.amin(dim=dims, keepdim=True)  # group shape: `x.shape` with `dims` reduced to 1
    hi = x.amax(dim=dims, keepdim=True)
    zero = _down(lo)
    scale = _up((hi - zero.float()) / qmax)
    scale32, zero32 = scale.float(), zero.float()
    safe = torch.where(scale32 > 0, scale32, torch.ones_like(scale32))
    codes = torch.round((x - zero32) / safe).clamp_(0, qmax).to(torch.uint8)  # x's shape
    return codes, scale, zero


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return codes if bits == 8 else pack_codes(codes, bits)


def _unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    return codes if bits == 8 else unpack_codes(codes, bits)


def quantize_block(
    block: torch.Tensor,
    bits: int,
    value_group: ValueGroup | None = None,
    value_bits: int | None = None,
) -> QuantizedBlock:
    """Quantize a KV unit `[L, 2, T, H, D]` (any T >= 1): keys to `bits` (8: L1, 4: L2),
    values to `value_bits` (default `bits`; 2 only as an experiment below INT4), grouped per
    `value_group` (default `DEFAULT_VALUE_GROUP[value_bits]`)."""
    value_bits = bits if value_bits is None else value_bits
    value_group = DEFAULT_VALUE_GROUP[value_bits] if value_group is None else value_group
    if bits not in (8, 4) or value_bits not in (8, 4, 2):
        raise ValueError(f"bits must be 8 or 4 (values also 2), got {bits}/{value_bits}")
    if block.dim() != 5 or block.shape[1] != 2 or block.shape[2] < 1:
        raise ValueError(f"expected [L, 2, T, H, D] with T >= 1, got {tuple(block.shape)}")
    if block.shape[-1] % (8 // min(bits, value_bits)):
        raise ValueError(f"int{min(bits, value_bits)} needs head_dim divisible by its packing")
    if value_group not in ("head", "token"):
        raise ValueError(f"value_group must be 'head' or 'token', got {value_group!r}")
    x = block.detach().to(torch.float32)  # bf16/fp16 -> fp32 is exact
    k_codes, k_scale, k_zero = _quantize_groups(x[:, 0], (_TOKEN_DIM,), bits)
    v_dims = (-1,) if value_group == "head" else (-2, -1)
    v_codes, v_scale, v_zero = _quantize_groups(x[:, 1], v_dims, value_bits)
    return QuantizedBlock(
        k_codes=_pack(k_codes, bits).contiguous(),  # [L, T, H, D * bits // 8]
        k_scale=k_scale.contiguous(),
        k_zero=k_zero.contiguous(),
        v_codes=_pack(v_codes, value_bits).contiguous(),
        v_scale=v_scale.contiguous(),
        v_zero=v_zero.contiguous(),
        bits=bits,
        shape=tuple(block.shape),
        dtype=block.dtype,
        value_bits=value_bits,
    )


def dequantize_parts(
    qb: QuantizedBlock, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V `[L, T, H, D]` each, separately: what `dequantize_block` stacks (decode
    attention writes them straight into its gathered context, saving that copy)."""
    out_dtype = qb.dtype if dtype is None else dtype
    k_codes, v_codes = _unpack(qb.k_codes, qb.bits), _unpack(qb.v_codes, qb.v_bits)
    k = k_codes.to(torch.float32) * qb.k_scale.float() + qb.k_zero.float()  # [L, T, H, D]
    v = v_codes.to(torch.float32) * qb.v_scale.float() + qb.v_zero.float()  # [L, T, H, D]
    return k.to(out_dtype), v.to(out_dtype)


def dequantize_block(qb: QuantizedBlock, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rebuild `[L, 2, T, H, D]` in the original dtype (or `dtype`, e.g. float32 to check
    the pure quantization error without the final rounding to bf16)."""
    return torch.stack(dequantize_parts(qb, dtype), dim=1)  # [L, 2, T, H, D]


def fake_quantize(block: torch.Tensor, bits: int, **recipe) -> torch.Tensor:
    """`dequantize_block(quantize_block(block))`: what attention reads from a demoted unit."""
    return dequantize_block(quantize_block(block, bits, **recipe))


def error_bound(qb: QuantizedBlock, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-element bound on |dequantize_block(qb, dtype) - block|, shape `qb.shape`, float32.

    scale / 2 from rounding to the grid, plus float slack: one float32 ulp of the group's
    magnitude for the fp32 arithmetic, and one ulp of the output dtype (bf16: 2^-7 relative)
    for the final cast.
    """
    out_dtype = qb.dtype if dtype is None else dtype
    eps = torch.finfo(torch.float32).eps + torch.finfo(out_dtype).eps
    L, _, T, H, D = qb.shape

    def half(scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
        qmax = (1 << bits) - 1
        scale, zero = scale.float(), zero.float()
        magnitude = torch.maximum(zero.abs(), (zero + qmax * scale).abs())
        return (scale / 2 + 2 * eps * magnitude).expand(L, T, H, D)

    k_half = half(qb.k_scale, qb.k_zero, qb.bits)
    return torch.stack((k_half, half(qb.v_scale, qb.v_zero, qb.v_bits)), dim=1)
