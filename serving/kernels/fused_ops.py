"""A Llama layer's small ops fused into four C++ calls (`csrc/fused_ops.cpp`): RMSNorm, the
residual add with the next RMSNorm, SiLU-and-multiply, and rotary on q/k with the paged KV
write. At decode batch sizes each eager op moves a few KB and costs its dispatch; these
replace ~25 of them per layer with the same rounding (see the C++ file's header)."""

from __future__ import annotations

import torch

from serving.kernels.build import load_kernel

DTYPES = (torch.float32, torch.bfloat16)


def kernel_available() -> bool:
    """Whether the fused ops can run here, building them on the first call."""
    return load_kernel("fused_ops", "rope_qkv_write")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * rms_norm(x.float()).to(x.dtype)` over the last dim of `x [rows, hidden]`,
    bit for bit."""
    return torch.ops.inferos.rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(rms_norm(residual + x), residual + x)`: a layer's residual add and the norm after it
    bit for bit."""
    return torch.ops.inferos.add_rms_norm(x, residual, weight, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for `gate_up [rows, 2 * intermediate]` = `cat(gate, up)`."""
    return torch.ops.inferos.silu_and_mul(gate_up)


def rope_qkv_write(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layer_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split `qkv [T, (H + 2 Hkv) * D]`, rotate q and k (HF rotate-half, `cos`/`sin`
    `[T, 1, D]` in qkv's dtype), write k and v into their slots of `layer_cache [2, blocks,
    block_size, Hkv, D]`; returns q `[T, H, D]`, k and v `[T, Hkv, D]`."""
    return torch.ops.inferos.rope_qkv_write(
        qkv, cos, sin, layer_cache, slot_mapping, num_heads, num_kv_heads
    )
