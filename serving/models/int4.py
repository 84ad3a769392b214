"""Lossless 4-bit repack of weights that come from a 4-bit GGUF (Q4_1), for small batches.

A single decode stream on CPU is bound by the bytes of weights read per step. Weights
dequantized from Q4_1 lie exactly on a 16-level grid per group of 32 inputs
(`w = min + q * (max - min) / 15`), so they can be packed back into 4 bits and multiplied
with our W4A8 kernel where the CPU has AMX int8 or AVX-512 VNNI (`serving/kernels/q4_amx.py`:
codes as nibbles, activations quantized to int8 per group of 32 as llama.cpp does), else our
vector kernel (`serving/kernels/q4_linear.py`: codes two a byte, fp32 scales and offsets, so
exactly the GGUF's weights), or torch's int4 CPU kernel where neither can be built (bf16
scales). A kernel loses to dense bf16 matmul once the batch is compute-bound, so each layer
keeps both and picks by the number of tokens in the step.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from serving.kernels import q4_amx
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


# On a CPU with the W4A8 kernel, steps of up to this many rows (a single stream's step and its
# speculative verify of 1 + `speculation.k_max` = 4 tokens, small batches) still run the
# exact kernel: the int8 activations' rounding flips near-tie tokens against a bf16
# reference (the vLLM hand-over's greedy checks decode 3 rows). Above it W4A8 runs: a c=8
# decode step measured 41.2 -> 32.1 ms with AMX at 8 rows (/tmp A/B in one engine, 12 rounds),
# a 3-row one 22.2 -> 17.3 ms, so a larger exact range costs batches dearly. (On a 2-vCPU
# Zen 5 with AVX-512 VNNI, 30 layers of each SmolLM2 shape: up to 4 rows the exact kernel
# is as fast, 2.5-3.6 ms against 2.6-3.1, both bound by the bytes read.)
EXACT_ROWS = 4

# The exact and torch kernels (fp32 models, CPUs with neither AMX nor AVX-512 VNNI) run int4
# up to this many rows at most: what they did before `model.int4_max_tokens` went to 64 for
# the W4A8 kernel.
NON_AMX_MAX_ROWS = 8


def kernel_for(group_size: int, dtype: torch.dtype) -> str:
    """The int4 kernel a layer with groups of `group_size` in a `dtype` model runs here:
    `w4a8` (AMX int8 or AVX-512 VNNI, bf16 models only: activations rounded to int8 per
    group of 32, as a bf16 model's already are to 8 significant bits; on AMX at 8-32 rows
    ~1.4-1.9x faster than dense bf16 and than `q4` from 4 rows, reading 6 bits a weight
    where `q4` reads 12 and bf16 16; with VNNI on a Zen 5 1.6x faster than `q4` at 8 rows
    and 3.5x faster than dense bf16), `q4` (activations as given, so an fp32 model's steps
    stay exact), or torch's."""
    if group_size == q4.GROUP_SIZE and dtype == torch.bfloat16 and q4_amx.kernel_available():
        return "w4a8"
    if group_size == q4.GROUP_SIZE and q4.kernel_available():
        return "q4"
    return "torch"


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
        self.kernel = kernel_for(group_size, linear.weight.dtype)
        # steps of up to EXACT_ROWS rows on a W4A8 machine: the exact kernel's codes
        self.codes_exact: torch.Tensor | None = None
        if self.kernel in ("w4a8", "q4"):  # exact scales (fp32): the GGUF's own weights
            scale, zero = scales_and_zeros.float().permute(2, 1, 0)  # 2 x [N, K/g]
            pack = q4_amx.pack_tiles if self.kernel == "w4a8" else q4.pack_tiles
            codes, scales, offsets = pack(q, scale, zero - 8 * scale)
            self.register_buffer("codes", codes)
            self.register_buffer("scales", scales)  # [N/16, K/32, 16]: both kernels' layout
            self.register_buffer("offsets", offsets)
            if self.kernel == "w4a8" and q4.kernel_available():
                self.codes_exact = q4.pack_codes(q)
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
        if self.kernel in ("w4a8", "q4"):
            if self.codes_exact is not None and x.shape[0] <= EXACT_ROWS:
                run, codes = q4.q4_linear, self.codes_exact
            elif self.kernel == "w4a8":
                run, codes = q4_amx.q4_amx_linear, self.codes
            else:
                run, codes = q4.q4_linear, self.codes
            out = run(x, codes, self.scales, self.offsets, self.weight.shape[0])
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


# token counts at which the int4 kernel is timed against the dense path of its layer; 128
# and 256 for prompt chunks: on a 2-vCPU Zen 5 the VNNI W4A8 kernel beats oneDNN's bf16
# matmul there too (30 layers of each SmolLM2 shape: 27.9 against 38.2 ms at 128 rows, 50.0
# against 64.4 at 256), where AMX's loses from 48 rows
INT4_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 128, 256)


def measure_max_int4_tokens(
    layers: HybridInt4Linear | list[HybridInt4Linear], dtype: torch.dtype, cap: int
) -> int:
    """The largest bucket (up to `cap`) up to which the int4 kernel beats the layers' dense
    path at every bucket; 0 if it never does. Timed over every given layer of one shape in
    turn (a model's 30 layers of it), each run after evicting the caches (see
    `fastest_s`): as in a forward pass, each layer's weights then come from memory or a
    far cache. One layer timed alone stays in this Xeon's 300 MB L3 even after the 64 MB
    eviction and flatters the kernel that reads more bytes (dense bf16 measured level with
    the AMX kernel at 2 rows that way; over the 30 layers the AMX kernel is 1.4-1.9x faster at
    8-32). On the Zen 4 int4 wins up to 8 on every SmolLM2 shape, the AMX kernel up to 32
    on the Xeon with AMX (dense bf16 from 48)."""
    from serving.models.dense_kernels import largest_winning_bucket

    stack = layers if isinstance(layers, list) else [layers]

    def run(x: torch.Tensor, max_int4_tokens: int) -> None:
        for layer in stack:
            layer.max_int4_tokens = max_int4_tokens
            layer(x)

    saved = [layer.max_int4_tokens for layer in stack]
    buckets = tuple(b for b in INT4_BUCKETS if b <= cap)
    try:
        return largest_winning_bucket(
            buckets,
            stack[0].weight.shape[1],
            dtype,
            fast=lambda x: run(x, x.shape[0]),
            dense=lambda x: run(x, 0),
        )
    finally:
        for layer, tokens in zip(stack, saved, strict=True):
            layer.max_int4_tokens = tokens


def use_measured_int4(model: nn.Module, dtype: torch.dtype, cap: int) -> None:
    """Each int4 layer runs int4 up to the token count measured for its shape (once per
    machine, `kernels.json`), at most `cap`; its dense path (after `use_measured_dense`)
    is what int4 is measured against."""
    from serving.models.dense_kernels import cache_key, measured_once

    layers = [m for m in model.modules() if isinstance(m, HybridInt4Linear)]

    def shape_of(m: HybridInt4Linear) -> tuple[int, int, int]:
        return (*m.weight.shape, m.group_size)

    by_shape: dict[tuple[int, int, int], list[HybridInt4Linear]] = {}
    for m in layers:
        by_shape.setdefault(shape_of(m), []).append(m)

    def cap_for(group: int) -> int:
        # only the W4A8 kernel goes past NON_AMX_MAX_ROWS: the exact and torch kernels keep
        # the cap they had before it (an fp32 model's steps, CPUs with neither AMX nor VNNI)
        return cap if kernel_for(group, dtype) == "w4a8" else min(cap, NON_AMX_MAX_ROWS)

    def key(n: int, k: int, group: int) -> str:
        # v7: buckets up to the cap, which is in the key (a new cap measures again), over
        # every layer of the shape; our kernels (group 32) or torch's, against the
        # prepacked dense path, caches cold; other groups (`model.weights: int4`) apart
        group_tag = "" if group == GROUP_SIZE else f" g{group}"
        kernel = kernel_for(group, dtype)
        return f"int4 tokens<={cap_for(group)}{group_tag} {kernel} v7|" + cache_key(dtype, n, k)

    keys = {shape: key(*shape) for shape in by_shape}
    measures = {
        keys[shape]: (lambda m=m, c=cap_for(shape[2]): measure_max_int4_tokens(m, dtype, c))
        for shape, m in by_shape.items()
    }
    known = measured_once(measures, "int4 kernel")
    for m in layers:
        m.max_int4_tokens = known[keys[shape_of(m)]]
    logger.info(
        "int4 path up to %s tokens per shape (kernels: %s)",
        {f"{n}x{k} g{g}": known[key] for (n, k, g), key in keys.items()},
        {f"{n}x{k} g{g}": _kernel_name(g, dtype) for n, k, g in keys},
    )


def _kernel_name(group_size: int, dtype: torch.dtype) -> str:
    """The int4 kernel a shape runs, with the instructions behind W4A8 (AMX or VNNI)."""
    kernel = kernel_for(group_size, dtype)
    return f"w4a8 on {q4_amx.isa()}" if kernel == "w4a8" else kernel
