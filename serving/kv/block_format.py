"""The unit of KV exchange between replicas and the store.

A block holds K and V of `block_size` consecutive tokens for every layer, laid out
`[num_layers, 2, block_size, num_kv_heads, head_dim]` (K at index 0, V at 1): the same
token-major order as the engines' paged pools, so export and import are plain copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # "float32" | "bfloat16" | "float16"

    def block_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    def bytes_per_block(self) -> int:
        return int(torch.tensor([], dtype=getattr(torch, self.dtype)).element_size()) * int(
            torch.Size(self.block_shape()).numel()
        )


@dataclass(slots=True)
class KVPayload:
    """KV of a sequence's first `num_tokens` tokens, as `ceil(num_tokens / block_size)` blocks.

    `blocks` holds tensors inside an engine, or Ray object refs while in flight between
    processes (the store keeps refs, never a second copy).
    """

    layout: KVLayout
    num_tokens: int
    blocks: list[Any] = field(default_factory=list)
    # Staged KV: an element may be a quantized unit of several blocks (`QuantizedBlock`);
    # then `spans[i]` is element i's number of blocks and `sizes[i]` its bytes.
    # None: every element is one full-precision block.
    spans: list[int] | None = None
    sizes: list[int] | None = None

    @property
    def num_blocks(self) -> int:
        return sum(self.spans) if self.spans is not None else len(self.blocks)

    @property
    def num_bytes(self) -> int:
        if self.sizes is not None:
            return sum(self.sizes)
        return self.num_blocks * self.layout.bytes_per_block()
