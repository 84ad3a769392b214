"""Lossless 4-bit repack of weights that come from a 4-bit GGUF (Q4_1), for small batches.

A single decode stream on CPU is bound by the bytes of weights read per step. Weights
dequantized from Q4_1 lie exactly on a 16-level grid per group of 32 inputs
(`w = min + q * (max - min) / 15`), so they can be packed back into 4 bits and multiplied
with our int4 kernel (`serving/kernels/q4_linear.py`: codes a byte each, fp32 scales and
offsets, so exactly the GGUF's weights), or torch's int4 CPU kernel where ours cannot be
built (bf16 scales). The kernel loses to dense bf16 matmul once the batch is
compute-bound, so each layer keeps both and picks by the number of tokens in the step.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from serving.kernels import q4_linear as q4

logger = logging.getLogger(__name__)

GROUP_SIZE = 32
INNER_K_TILES = 8
_ops = torch.ops.aten


def int4_kernel_available() -> bool:
    return hasattr(_ops, "_weight_int4pack_mm_for_cpu")


def quantize_on_grid(
    weight: torch.Tensor, group_size: int = GROUP_SIZE, atol: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(q [N, K] int32 in 0..15, scales_and_zeros [K/g, N, 2])` if `weight` is exactly on
    a 4-bit grid per group (up to `atol` relative to the group's range), else None."""
    n, k = weight.shape
    if k % group_size:
        return None
    g = weight.float().view(n, k // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo) / scale).clamp(0, 15)
    if ((q * scale + lo) - g).abs().max() > atol * max(float((hi - lo).max()), 1.0):
        return None
    # torch's kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale
    scales = scale.squeeze(-1)
    zeros = lo.squeeze(-1) + 8 * scales
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
    return q.view(n, k).to(torch.int32), scales_and_zeros


class HybridInt4Linear(nn.Module):
    """Dense weight for large batches, packed int4 for up to `max_int4_tokens` tokens."""

    def __init__(
        self,
        linear: nn.Linear,
        q: torch.Tensor,
        scales_and_zeros: torch.Tensor,
        max_int4_tokens: int,
        group_size: int = GROUP_SIZE,
    ):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.max_int4_tokens = max_int4_tokens
        self.group_size = group_size  # inputs per (scale, zero): Q4_1's 32, or `model.weights`'
        self.ours = group_size == q4.GROUP_SIZE and q4.kernel_available()
        if self.ours:  # exact scales (fp32): the GGUF's own weights, and faster (see q4)
            scale, zero = scales_and_zeros.float().permute(2, 1, 0)  # 2 x [N, K/g]
            codes, scales, offsets = q4.pack_tiles(q, scale, zero - 8 * scale)
            self.register_buffer("codes", codes)
            self.register_buffer("scales", scales)
            self.register_buffer("offsets", offsets)
        else:
            self.register_buffer(
                "packed", _ops._convert_weight_to_int4pack_for_cpu(q, INNER_K_TILES)
            )
            # torch's kernel computes in bf16 (with fp32 activations it runs scalar: 10-30x
            # slower)
            self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16))
        # the path above max_int4_tokens: a measured dtype switch (dense_kernels), or plain
        self.dense: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_int4_tokens:
            if self.dense is not None:
                return self.dense(x)
            return F.linear(x, self.weight, self.bias)
        if self.ours:
            out = q4.q4_linear(x, self.codes, self.scales, self.offsets, self.weight.shape[0])
            out = out.to(x.dtype)
            return out if self.bias is None else out + self.bias
        x16 = x.to(torch.bfloat16)
        out = _ops._weight_int4pack_mm_for_cpu(
            x16, self.packed, self.group_size, self.scales_and_zeros
        )
        out = out.to(x.dtype)
        return out if self.bias is None else out + self.bias


def repack_int4(
    model: nn.Module, source_weights: dict[str, torch.Tensor], max_int4_tokens: int
) -> int:
    """Swap every `nn.Linear` whose source (pre-cast, fp32) weight is on a 4-bit grid for a
    `HybridInt4Linear`; returns how many. `source_weights` maps `<module>.weight` names to
    the weights as loaded, before any cast to bf16 moved them off the grid."""
    if max_int4_tokens <= 0 or not int4_kernel_available():
        return 0
    swapped = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            key = f"{parent_name}.{name}.weight" if parent_name else f"{name}.weight"
            if type(child) is not nn.Linear or key not in source_weights:
                continue
            packed = quantize_on_grid(source_weights[key])
            if packed is not None:
                setattr(parent, name, HybridInt4Linear(child, *packed, max_int4_tokens))
                swapped += 1
    logger.info("int4 repack: %d linear layers on a 4-bit grid", swapped)
    return swapped


# token counts at which the int4 kernel is timed against the dense path of its layer
INT4_BUCKETS = (1, 2, 4, 8, 16)


def measure_max_int4_tokens(layer: HybridInt4Linear, dtype: torch.dtype, cap: int) -> int:
    """The largest bucket (up to `cap`) up to which the int4 kernel beats the layer's dense
    path at every bucket; 0 if it never does. Timed with cold caches (see `fastest_s`):
    hot, the dense bf16 path looked faster from 2 tokens on this Zen 4; cold, as weights
    are in a forward pass, int4 wins up to 8 on every SmolLM2 shape."""
    from serving.models.dense_kernels import largest_winning_bucket

    def run(x: torch.Tensor, max_int4_tokens: int) -> torch.Tensor:
        layer.max_int4_tokens = max_int4_tokens
        return layer(x)

    saved = layer.max_int4_tokens
    buckets = tuple(b for b in INT4_BUCKETS if b <= cap)
    try:
        return largest_winning_bucket(
            buckets,
            layer.weight.shape[1],
            dtype,
            fast=lambda x: run(x, x.shape[0]),
            dense=lambda x: run(x, 0),
        )
    finally:
        layer.max_int4_tokens = saved


def use_measured_int4(model: nn.Module, dtype: torch.dtype, cap: int) -> None:
    """Each int4 layer runs int4 up to the token count measured for its shape (once per
    machine, `kernels.json`), at most `cap`; its dense path (after `use_measured_dense`)
    is what int4 is measured against."""
    from serving.models.dense_kernels import cache_key, measured_once

    layers = [m for m in model.modules() if isinstance(m, HybridInt4Linear)]

    def shape_of(m: HybridInt4Linear) -> tuple[int, int, int]:
        return (*m.weight.shape, m.group_size)

    by_shape = {shape_of(m): m for m in layers}

    def key(n: int, k: int, group: int) -> str:
        # v5: our kernel (group 32) or torch's, against the prepacked dense path, caches
        # cold; other groups (`model.weights: int4`) are measured apart
        group_tag = "" if group == GROUP_SIZE else f" g{group}"
        kernel = "q4" if q4.kernel_available() else "torch"
        return f"int4 tokens<={cap}{group_tag} {kernel} v5|" + cache_key(dtype, n, k)

    keys = {shape: key(*shape) for shape in by_shape}
    measures = {
        keys[shape]: (lambda m=m: measure_max_int4_tokens(m, dtype, cap))
        for shape, m in by_shape.items()
    }
    known = measured_once(measures, "int4 kernel")
    for m in layers:
        m.max_int4_tokens = known[keys[shape_of(m)]]
    logger.info(
        "int4 path up to %s tokens per shape",
        {f"{n}x{k} g{g}": known[key] for (n, k, g), key in keys.items()},
    )
