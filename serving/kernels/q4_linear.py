"""Weight-only int4 linear, asymmetric per group of 32 inputs (`csrc/q4_linear.cpp`): the
kernel `HybridInt4Linear` runs for small steps, two codes a byte (small steps are bound by
the bytes read; an AND and a shift split a byte). Weights are
`q * scale + offset` with `q` in 0..15 (torch's int4 layout's `(q - 8) * scale + zero` is
the same weight with `offset = zero - 8 * scale`)."""

from __future__ import annotations

import torch

from serving.kernels.build import load_kernel

GROUP_SIZE = 32
TILE = 16  # output rows the kernel computes together (see csrc/q4_linear.cpp)


def kernel_available() -> bool:
    return load_kernel("q4_linear", "q4_linear")


def pack_tiles(
    q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`q [N, K]` (0..15), `scales` and `offsets` `[N, K/32]` → the kernel's tiles of 16
    output rows: codes `[ceil(N/16), K/2, 16]` uint8 (two a byte), scales and offsets
    `[ceil(N/16), K/32, 16]` fp32 (rows past N are zero)."""
    n = q.shape[0]
    pad = -n % TILE
    tiles = (n + pad) // TILE
    codes = pack_codes(q)

    def tiled(t: torch.Tensor) -> torch.Tensor:
        t = torch.nn.functional.pad(t.float(), (0, 0, 0, pad))
        return t.view(tiles, TILE, -1).transpose(1, 2).contiguous()

    return codes, tiled(scales), tiled(offsets)


def pack_codes(q: torch.Tensor) -> torch.Tensor:
    """The codes half of `pack_tiles`: `q [N, K]` → `[ceil(N/16), K/2, 16]` uint8, inputs 2p
    and 2p+1 of an output in the low and high nibble of its byte p."""
    n = q.shape[0]
    pad = -n % TILE
    q = torch.nn.functional.pad(q.to(torch.uint8), (0, 0, 0, pad))
    pairs = q[:, 0::2] | (q[:, 1::2] << 4)  # [N, K/2]
    return pairs.view((n + pad) // TILE, TILE, -1).transpose(1, 2).contiguous()


def q4_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    n: int,
) -> torch.Tensor:
    """`x [M, K]` (fp32 or bf16) times the weight `q * scale + offset` transposed: fp32
    `[M, n]`, from the tiles of `pack_tiles`. Call `kernel_available` first."""
    out = torch.ops.inferos.q4_linear(x, codes, scales, offsets)
    return out if out.shape[1] == n else out[:, :n]
