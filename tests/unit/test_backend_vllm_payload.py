"""vLLM prefill backend's conversion of per-layer K/V into our KV blocks (no vllm needed)."""

from __future__ import annotations

import torch

from serving.backends.vllm.prefill import to_payload


def test_per_layer_kv_becomes_padded_blocks_of_our_size() -> None:
    num_layers, n, heads, dim, block_size = 3, 37, 2, 8, 16
    torch.manual_seed(0)
    saved = {
        i: (
            torch.randn(n, heads, dim, dtype=torch.bfloat16),
            torch.randn(n, heads, dim, dtype=torch.bfloat16),
        )
        for i in range(num_layers)
    }
    payload = to_payload(saved, n, block_size)
    assert payload.num_tokens == n and payload.num_blocks == 3
    assert payload.layout.block_shape() == (num_layers, 2, block_size, heads, dim)
    assert payload.layout.dtype == "bfloat16"
    joined = torch.cat(payload.blocks, dim=2)  # [L, 2, 48, H, D]
    for i, (k, v) in saved.items():
        assert torch.equal(joined[i, 0, :n], k) and torch.equal(joined[i, 1, :n], v)
    assert not joined[:, :, n:].any()  # the last block's tail is zero padding
    assert all(b.is_contiguous() for b in payload.blocks)
