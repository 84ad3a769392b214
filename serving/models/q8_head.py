"""The LM head on its GGUF Q8_0 grid for steps that sample few rows.

Single-stream, the LM head (SmolLM2: 49152 x 576, tied to the embedding) is the largest
matrix read per token: 57 MB in bf16, 113 MB in fp32. The GGUF stores it as Q8_0 (int8
codes, one fp16 scale per 32 weights), so the weights as loaded are exactly `codes *
scale`, and the int8 kernel (`serving/kernels/q8_linear.py`) reads 28 MB of codes and
sums in fp32: the same weights as the fp32 model, closer to them than a bf16 copy, and
measured here (Zen 4 EPYC, one thread, CPU time) at 1.5 ms a row against 6.8 ms in bf16.
With more rows the bf16/fp32 GEMM catches up, so the head keeps its dense module and
switches at the row count measured once per machine (`kernels.json`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from serving.kernels import q8_linear as q8
from serving.models.dense_kernels import (
    EVICT_BYTES,
    cache_key,
    largest_winning_bucket,
    last_level_cache_bytes,
    measured_once,
)

logger = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# The int8 head must beat the dense one by this much, timed alone, to run: in the engine
# (AMX Xeon, bf16, 2 threads, decode steps A/B in one process) it saved 1.9 ms a step at 1
# row and 0.9 at 4, and lost 0.6 at 8, where timed alone it measured 1.18x faster.
HEAD_MARGIN = 1.25
# At most this much is written to evict the caches before each timed run (2x the largest
# cache the OS reports, so a 300 MB L3 cannot keep the 57 MB bf16 head hot between runs).
MAX_EVICT_BYTES = 2**30


class Q8Head(nn.Module):
    """fp32 logits from the int8 codes for up to `max_q8_rows` rows, from `dense` (the head
    as it was) above. `weight` stays the model's own: the speculative proposers slice it."""

    def __init__(self, dense: nn.Module, codes: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.dense = dense
        self.weight = dense.weight
        self.out_features = codes.shape[0]
        packed_codes, packed_scales = q8.pack_tiles(codes, scales)
        self.register_buffer("packed_codes", packed_codes, persistent=False)
        self.register_buffer("packed_scales", packed_scales, persistent=False)
        self.max_q8_rows = 0

    def q8(self, x: torch.Tensor) -> torch.Tensor:
        return q8.q8_linear(x, self.packed_codes, self.packed_scales, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.max_q8_rows:
            return self.q8(x)
        return self.dense(x)


def measure_max_q8_rows(head: Q8Head, dtype: torch.dtype) -> int:
    """The largest row bucket up to which the int8 kernel beats the dense head by
    `HEAD_MARGIN` at every bucket (0 if it never does)."""
    in_features = head.packed_codes.shape[1]
    evict_bytes = min(max(EVICT_BYTES, 2 * last_level_cache_bytes()), MAX_EVICT_BYTES)
    return largest_winning_bucket(
        ROW_BUCKETS, in_features, dtype, head.q8, head.dense, evict_bytes, HEAD_MARGIN
    )


def use_q8_head(model: nn.Module, source_weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Put the int8 head on `model.lm_head` if its weight as loaded (`source_weight`, fp32)
    lies on a Q8_0 grid and the kernel builds here; True if it did."""
    packed = q8.quantize_on_q8_grid(source_weight)
    if packed is None:
        return False
    return install_q8_head(model, *packed, dtype, "Q8_0 grid")


def install_q8_head(
    model: nn.Module, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, what: str
) -> bool:
    """`model.lm_head` runs on int8 `codes [N, K]` with `scales [N, K/32]` for the rows
    measured faster than its dense head (`what` names the codes' origin in the log)."""
    if not q8.kernel_available():
        return False
    head = Q8Head(model.lm_head, codes, scales)
    n, k = codes.shape
    # v4: caches evicted past the reported L3, a margin of HEAD_MARGIN
    key = "q8 head rows v4|" + cache_key(dtype, n, k)
    head.max_q8_rows = measured_once({key: lambda: measure_max_q8_rows(head, dtype)}, "q8 head")[
        key
    ]
    if head.max_q8_rows == 0:
        return False
    model.lm_head = head
    logger.info("LM head: int8 codes (%s) for up to %d rows", what, head.max_q8_rows)
    return True
