"""Where vLLM's CPU attention cache keeps each token's K and V inside a block.

A layer's cache is `[num_blocks, Hkv, block_size, 2 * D]`, but what lies inside a block
depends on the kernel ISA vLLM picked for this CPU (`cpu_attn._get_attn_isa`): with "vec"
and "vec16" each head holds its keys transposed (`[D, block_size]`) then its values
(`[block_size, D]`); with "amx" (bf16 on CPUs with AMX tiles) both are packed in 16-token
tiles with pairs interleaved for the tile loads. Rather than copy each layout here (one
copy, measured on a CPU without AMX, once scrambled every handed-over prompt on a CPU
with it), `probe_block_layout` asks vLLM's own cache-write op where it puts every
(token, head, dim) of a block, once per layout, and the connector gathers with that map.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

# a digit of a probe value: small integers are exact in bf16, fp16 and fp32 alike
_DIGIT_BASE = 16
PROBE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class BlockLayout:
    """Offsets into one block's flat storage (`kv_layer[b].flatten()`), in token-major
    order: entry `(t * Hkv + h) * D + d` is where token t's head h, dim d lies."""

    num_kv_heads: int
    block_size: int
    head_dim: int
    key_offsets: torch.Tensor  # [block_size * Hkv * D], int64
    value_offsets: torch.Tensor  # [block_size * Hkv * D], int64


@lru_cache(maxsize=8)
def probe_block_layout(
    isa: str, num_kv_heads: int, block_size: int, head_dim: int, dtype: torch.dtype
) -> BlockLayout:
    """Write numbered K/V into a one-block scratch cache with vLLM's cache-write op for
    `isa` and read back where each number landed. A number is written a base-16 digit per
    pass (each digit exact in any probe dtype); one more pass tells keys from values."""
    from vllm import _custom_ops as ops

    if dtype not in PROBE_DTYPES:
        raise NotImplementedError(
            f"KV hand-over from vLLM's {dtype} cache is not supported (quantized KV cache?); "
            f"use kv_cache_dtype='auto' with one of {PROBE_DTYPES}"
        )
    n = block_size * num_kv_heads * head_dim
    index = torch.arange(n).view(block_size, num_kv_heads, head_dim)
    cache = torch.zeros(1, num_kv_heads, block_size, 2 * head_dim, dtype=dtype)
    # the backend's own view of the cache (cpu_attn.py, CPUAttentionBackendImpl.forward)
    key_cache, value_cache = cache.view(1, num_kv_heads, 2 * block_size, head_dim).chunk(2, dim=2)
    slots = torch.arange(block_size)

    def write(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        cache.zero_()
        ops.cpu_attn_reshape_and_cache(
            key.to(dtype), value.to(dtype), key_cache, value_cache, slots, isa
        )
        return cache.flatten().to(torch.int64)

    side = write(torch.ones_like(index), torch.full_like(index, 2))  # 1: key, 2: value
    code = torch.zeros_like(side)
    place = 1
    while place < n:
        digit = index // place % _DIGIT_BASE + 1  # 0 stays "never written"
        code += (write(digit, digit) - 1) * place
        place *= _DIGIT_BASE
    return BlockLayout(
        num_kv_heads,
        block_size,
        head_dim,
        _inverse(code, side == 1, n, isa, "keys"),
        _inverse(code, side == 2, n, isa, "values"),
    )


def _inverse(code: torch.Tensor, mask: torch.Tensor, n: int, isa: str, what: str) -> torch.Tensor:
    """Offsets of numbers 0..n-1 from the numbers found at each offset; every number must
    be found exactly once, or the layout is not one we can gather from."""
    offsets = mask.nonzero().flatten()
    found = code[offsets]
    if offsets.numel() != n or not torch.equal(found.sort().values, torch.arange(n)):
        raise RuntimeError(
            f"vLLM's CPU KV cache ({isa=}) does not hold each token's {what} exactly once per "
            f"block: {offsets.numel()} slots for {n} values; the connector cannot read it"
        )
    inverse = torch.empty(n, dtype=torch.int64)
    inverse[found] = offsets
    return inverse


def gather_block_tokens(
    kv_layer: torch.Tensor, layout: BlockLayout, block_ids: list[int], num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V `[num_tokens, Hkv, D]` of the first tokens held in `block_ids`, in order."""
    ids = torch.tensor(block_ids, dtype=torch.long)
    blocks = kv_layer.view(kv_layer.shape[0], -1).index_select(0, ids)  # [nb, block elems]
    shape = (-1, layout.num_kv_heads, layout.head_dim)
    k = blocks[:, layout.key_offsets].view(shape)[:num_tokens]
    v = blocks[:, layout.value_offsets].view(shape)[:num_tokens]
    return k.contiguous(), v.contiguous()
