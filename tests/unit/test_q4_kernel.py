"""Our int4 kernel (`csrc/q4_linear.cpp`): equal to the dequantized matmul for any row count,
output count (tiles padded) and group count, and exact on a GGUF Q4_1 grid (fp32 scales),
which is what `HybridInt4Linear` runs for small steps."""

from __future__ import annotations

import pytest
import torch

from serving.kernels import q4_linear as q4
from serving.models.int4 import quantize_on_grid
from serving.models.weight_quant import dequantize_int4, quantize_int4_groups
from tests.unit.test_int4 import _grid_weight, repacked_layer

pytestmark = pytest.mark.skipif(not q4.kernel_available(), reason="the q4 kernel did not build")


@pytest.mark.parametrize("n,k", [(16, 32), (40, 96), (200, 576)])
@pytest.mark.parametrize("m", [1, 3, 4, 9])
def test_equals_the_dequantized_matmul(n: int, k: int, m: int) -> None:
    gen = torch.Generator().manual_seed(n * k + m)
    w = torch.randn(n, k, generator=gen) * 0.05
    q, sz = quantize_int4_groups(w, 32)
    scale, zero = sz.float().permute(2, 1, 0)
    codes, scales, offsets = q4.pack_tiles(q, scale, zero - 8 * scale)
    assert codes.shape == (-(-n // 16), k // 2, 16) and codes.dtype == torch.uint8
    x = torch.randn(m, k, generator=gen)
    reference = x.double() @ dequantize_int4(q, sz).double().T
    got = q4.q4_linear(x, codes, scales, offsets, n)
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert torch.allclose(got.double(), reference, atol=1e-5 * float(reference.abs().max()))
    bf16 = q4.q4_linear(x.to(torch.bfloat16), codes, scales, offsets, n)  # activations as given
    assert torch.allclose(bf16.double(), reference, atol=2e-2 * float(reference.abs().max()))


def test_hybrid_layer_is_exact_on_a_gguf_grid_with_fp32_activations() -> None:
    """fp32 scales and offsets: the Q4_1 weights exactly, no bf16 rounding of either."""
    w = _grid_weight(96, 128, seed=4)
    assert quantize_on_grid(w) is not None
    layer = repacked_layer(w, torch.float32, max_int4_tokens=8)
    assert layer.kernel == "q4"  # fp32: never amx
    x = torch.randn(5, 128)
    reference = x.double() @ w.double().T
    got = layer(x)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), reference, atol=1e-5 * float(reference.abs().max()))
