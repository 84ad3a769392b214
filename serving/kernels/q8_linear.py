"""Weight-only int8 linear on GGUF's Q8_0 grid (`csrc/q8_linear.cpp`): int8 codes and one
fp32 scale per 32 inputs, exact for weights that came from a Q8_0 tensor."""

from __future__ import annotations

import torch

from serving.kernels.build import load_kernel

GROUP_SIZE = 32
TILE = 16  # output rows the kernel computes together (see csrc/q8_linear.cpp)


def kernel_available() -> bool:
    return load_kernel("q8_linear", "q8_linear")


def quantize_on_q8_grid(
    weight: torch.Tensor, atol: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(codes [N, K] int8, scales [N, K/32] fp32)` with `codes * scales == weight` exactly,
    if `weight` (fp32, as loaded) lies on a Q8_0 grid (each group of 32 a multiple of its
    scale `max|w| / 127`, codes within ±127); else None."""
    n, k = weight.shape
    if k % GROUP_SIZE or weight.dtype != torch.float32:
        return None
    groups = weight.view(n, k // GROUP_SIZE, GROUP_SIZE)
    scales = groups.abs().amax(-1, keepdim=True) / 127  # [N, K/32, 1]
    codes = torch.where(scales > 0, groups / scales.clamp(min=1e-30), 0.0).round()
    if (codes * scales - groups).abs().max() > atol:
        return None
    return codes.view(n, k).to(torch.int8), scales.view(n, k // GROUP_SIZE).contiguous()


def pack_tiles(codes: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[N, K]` codes and `[N, K/32]` scales → the kernel's tiles of 16 output rows,
    `[ceil(N/16), K, 16]` and `[ceil(N/16), K/32, 16]` (rows past N are zero)."""
    n = codes.shape[0]
    pad = -n % TILE
    codes = torch.nn.functional.pad(codes, (0, 0, 0, pad))
    scales = torch.nn.functional.pad(scales, (0, 0, 0, pad))
    tiles = (n + pad) // TILE
    packed_codes = codes.view(tiles, TILE, -1).transpose(1, 2).contiguous()
    packed_scales = scales.view(tiles, TILE, -1).transpose(1, 2).contiguous()
    return packed_codes, packed_scales


def q8_linear(
    x: torch.Tensor, packed_codes: torch.Tensor, packed_scales: torch.Tensor, n: int
) -> torch.Tensor:
    """`x [M, K]` (fp32 or bf16) times the weight `codes * scales` transposed: fp32 `[M, n]`,
    from the tiles of `pack_tiles`. Call `kernel_available` first."""
    out = torch.ops.inferos.q8_linear(x, packed_codes, packed_scales)
    return out if out.shape[1] == n else out[:, :n]
