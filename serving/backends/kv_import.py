"""Where KV blocks from the store become blocks of a backend's pool.

The one seam for block formats: a block may arrive at L0 in another float dtype (a bf16
torch prefill feeding a float32 ONNX Runtime decode) or, once staged KV is wired in,
quantized at L1/L2 (`serving.kv.quant.QuantizedBlock`); either way the pool gets a dense
`[L, 2, block_size, Hkv, D]` tensor in its own dtype.
"""

from __future__ import annotations

import torch

from serving.kv.block_format import KVLayout
from serving.kv.quant import QuantizedBlock, dequantize_block


def to_pool_block(block: torch.Tensor | QuantizedBlock, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(block, QuantizedBlock):
        return dequantize_block(block, dtype)
    return block if block.dtype == dtype else block.to(dtype)


def same_geometry(a: KVLayout, b: KVLayout) -> bool:
    """Layouts that differ at most in dtype: their blocks convert into each other."""
    return a.block_shape() == b.block_shape()
