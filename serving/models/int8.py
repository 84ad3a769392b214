"""Per-output-channel int8 linear layers (`model.weights: int8`) on the Q8_0 kernel.

The int8 kernel (`serving/kernels/q8_linear.py`) takes one fp32 scale per 32 inputs; a
per-channel scale repeated over a row's groups is the same weight, and that kernel beat
torch's own per-channel `_weight_int8pack_mm` on every SmolLM2 shape here (Zen 4, 2
threads, cold caches: 1 row 49-107 us against 72-160 us, the LM head 0.95 ms against 2.2
ms). As for int4, each layer keeps its dense path for the steps where that runs faster.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from serving.kernels import q8_linear as q8
from serving.models.dense_kernels import cache_key, largest_winning_bucket, measured_once
from serving.models.q8_head import ROW_BUCKETS, Q8Head

logger = logging.getLogger(__name__)


def group_scales(scales: torch.Tensor, in_features: int) -> torch.Tensor:
    """Per-channel `scales [N]` as the kernel's `[N, K/32]` (the same scale in each group)."""
    return scales[:, None].expand(-1, in_features // q8.GROUP_SIZE).contiguous()


class Int8Linear(Q8Head):
    """int8 codes for up to `max_q8_rows` rows, `dense` (the layer as it was, holding the
    dequantized weight) above; the output in the input's dtype, as a layer's must be."""

    def __init__(self, dense: nn.Module, codes: torch.Tensor, scales: torch.Tensor, max_rows: int):
        super().__init__(dense, codes, group_scales(scales, codes.shape[1]))
        self.bias = dense.bias
        self.max_q8_rows = max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_q8_rows:
            return self.dense(x)
        out = self.q8(x.contiguous())
        return (out if self.bias is None else out + self.bias).to(x.dtype)


def int8_kernel_fits(weight: torch.Tensor) -> bool:
    return weight.shape[1] % q8.GROUP_SIZE == 0 and q8.kernel_available()


def use_measured_int8(model: nn.Module, dtype: torch.dtype, cap: int) -> None:
    """Each int8 layer runs its codes up to the row count measured for its shape (once per
    machine, `kernels.json`), at most `cap`."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    by_shape = {tuple(m.weight.shape): m for m in layers}
    keys = {shape: f"int8 rows<={cap} v1|" + cache_key(dtype, *shape) for shape in by_shape}

    def measure(m: Int8Linear) -> int:
        buckets = tuple(b for b in ROW_BUCKETS if b <= cap)
        return largest_winning_bucket(buckets, m.weight.shape[1], dtype, m.q8, m.dense)

    known = measured_once(
        {keys[shape]: (lambda m=m: measure(m)) for shape, m in by_shape.items()}, "int8 kernel"
    )
    for m in layers:
        m.max_q8_rows = known[keys[tuple(m.weight.shape)]]
    logger.info(
        "int8 path up to %s rows per shape", {f"{n}x{k}": known[k_] for (n, k), k_ in keys.items()}
    )
