"""Decode attention straight from the paged KV cache: one C++ call per layer for every
sequence of a decode step (`csrc/paged_attention.cpp`, built once per machine by `build`).

The torch path gathers each sequence's whole context out of the cache (`index_select`) at
every layer and step, then runs matmul/masked_fill/softmax/matmul; the kernel reads each
K/V row once through the block table, in place, and keeps scores and sums in fp32. Where
the kernel cannot build, `kernel_available` is False (one warning) and callers keep the
torch path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from serving.kernels.build import load_kernel

if TYPE_CHECKING:
    from serving.engine.staged_kv import StagedPlan

_DTYPES = (torch.float32, torch.bfloat16)


def kernel_available() -> bool:
    """Whether `paged_decode_attention` can run here, building the kernel on the first call."""
    return load_kernel("paged_attention", "paged_decode_attention")


def paged_decode_attention(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of one query per sequence, `q [num_seqs, num_heads, head_dim]`, over the
    first `context_lens[i]` tokens of `layer_cache [2, num_blocks, block_size, num_kv_heads,
    head_dim]` reached through `block_tables [num_seqs, max_blocks]` (int64, both).

    fp32 or bf16 q and cache in any combination; scores, softmax and the sums in fp32;
    returns `[num_seqs, num_heads, head_dim]` in q's dtype. Call `kernel_available` first."""
    return torch.ops.inferos.paged_decode_attention(
        q, layer_cache, block_tables, context_lens, float(scale)
    )


def paged_decode_attention_staged(
    q: torch.Tensor, layer_cache: torch.Tensor, plan: StagedPlan, layer: int, scale: float
) -> torch.Tensor:
    """`staged_decode_attention` (serving/models/staged_attention.py) without the attention
    mass: each row's valid L0 tokens, read through `plan.compact.l0_tables`, and its INT8/INT4
    units, read as codes with the key scale folded into the query, softmaxed together.
    Scores, softmax and sums in fp32; returns `[num_seqs, num_heads, head_dim]` in q's dtype."""
    compact = plan.compact
    assert compact is not None
    fields: dict[str, list[torch.Tensor]] = {}
    valid, k_bits, v_bits = [], [], []
    for key, cu in compact.units.items():
        pool = plan.pools[key]
        for name, t in pool.layer_fields(cu.slots.flatten(), layer).items():
            fields.setdefault(name, []).append(t)
        valid.append(cu.valid)
        k_bits.append(pool.bits)
        v_bits.append(pool.v_bits)
    names = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
    return torch.ops.inferos.paged_decode_attention_staged(
        q,
        layer_cache,
        compact.l0_tables,
        compact.l0_valid,
        *(fields.get(n, []) for n in names),
        valid,
        k_bits,
        v_bits,
        float(scale),
    )


def kernel_supports(q: torch.Tensor, layer_cache: torch.Tensor) -> bool:
    """Whether this layer's decode attention can go through the kernel: CPU tensors, fp32 or
    bf16, a contiguous cache (a layer of the pool is), and a kernel that built."""
    return (
        q.device.type == "cpu"
        and layer_cache.device.type == "cpu"
        and q.dtype in _DTYPES
        and layer_cache.dtype in _DTYPES
        and layer_cache.is_contiguous()
        and kernel_available()
    )
