"""Int4 linear for decode batches (`csrc/q4_amx.cpp`, W4A8): the Q4_1 codes as nibbles in
the AMX B operand's order, the activations rounded to int8 per group of 32 as llama.cpp
does; multiplied with AMX tiles where the CPU and OS allow them, else with AVX-512 VNNI
(same results). Where neither is there, `kernel_available` is False."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serving.kernels.build import load_kernel

GROUP_SIZE = 32
TILE = 16  # outputs per AMX B tile


def kernel_built() -> bool:
    """Whether the library builds here (it does on any x86-64: without AMX it only says so)."""
    return load_kernel("q4_amx", "q4_amx_linear")


def kernel_available() -> bool:
    return kernel_built() and torch.ops.inferos.q4_amx_available()


def isa() -> str:
    """"amx", "avx512_vnni", or "" where the kernel cannot run."""
    return torch.ops.inferos.q4_amx_isa() if kernel_built() else ""


def pack_tiles(
    q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`q [N, K]` (0..15), `scales` and `offsets` `[N, K/32]` → nibbles `[T, K/32, 256]`
    uint8 (T = N/16 rounded up), scales and offsets `[T, K/32, 16]` fp32; rows past N are
    zero. Within a (tile, group), the B operand's 512 bytes are `[8][16
    outputs][4 inputs]`; byte `128 c + i` is the low nibble of packed byte `64 c + i`, byte
    `128 c + 64 + i` its high one."""
    n, k = q.shape
    pad = -n % TILE
    tiles, groups = (n + pad) // TILE, k // GROUP_SIZE
    q = F.pad(q.to(torch.uint8), (0, 0, 0, pad))
    b = q.view(tiles, TILE, groups, GROUP_SIZE // 4, 4).permute(0, 2, 3, 1, 4)
    b = b.reshape(tiles, groups, 4, 2, 64)
    packed = (b[:, :, :, 0] | (b[:, :, :, 1] << 4)).reshape(tiles, groups, 256).contiguous()

    def tiled(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t.float(), (0, 0, 0, pad))
        return t.view(tiles, TILE, groups).transpose(1, 2).contiguous()

    return packed, tiled(scales), tiled(offsets)


def q4_amx_linear(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, n: int
) -> torch.Tensor:
    """`x [M, K]` (fp32 or bf16) times the weight `q * scale + offset` transposed, the
    activations rounded to int8 per group of 32: `[M, n]` in x's dtype (fp32 sums)."""
    out = torch.ops.inferos.q4_amx_linear(x, packed, scales, offsets)
    return out if out.shape[1] == n else out[:, :n]
