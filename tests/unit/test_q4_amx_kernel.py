"""The W4A8 int4 kernel (`csrc/q4_amx.cpp`, AMX tiles or AVX-512 VNNI, whichever this CPU
runs): equal to the dequantized matmul of the activations as it rounds them (int8 per group
of 32, scale max|x| / 127, round half to even) for any row count (AMX's 16-row tiles and
the trimmed last one; VNNI's 8-row blocks and the 1-, 2-, 4- or 8-row pass of what is
left), output count (tiles padded) and group count; within that rounding of the exact
matmul; what a bf16 model's `HybridInt4Linear` runs on such a machine."""

from __future__ import annotations

import pytest
import torch

from serving.kernels import q4_amx
from serving.models.weight_quant import dequantize_int4, quantize_int4_groups
from tests.unit.test_int4 import _grid_weight, repacked_layer

pytestmark = pytest.mark.skipif(
    not q4_amx.kernel_available(),
    reason="neither AMX int8 nor AVX-512 VNNI on this CPU (or the kernel did not build)",
)


def _activations_as_rounded(x: torch.Tensor) -> torch.Tensor:
    """What the kernel multiplies: each group of 32 of a row as int8 times its scale, with
    the code computed as the kernel computes it, `x * (127 / max|x|)` in fp32, then rounded
    half to even (in double, a value the fp32 product puts at exactly k + 0.5 can land a
    hair above it and round the other way: seen once in 172,800 values)."""
    g = x.float().view(x.shape[0], -1, 32)
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax.clamp(min=1e-30), 0.0)  # fp32, as the kernel
    codes = (g * inv).round()  # fp32 product, half to even
    return (codes.double() * (amax / 127.0).double()).view_as(x)


def _packed(n: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    q, sz = quantize_int4_groups(w, 32)
    scale, zero = sz.float().permute(2, 1, 0)
    return q, sz, q4_amx.pack_tiles(q, scale, zero - 8 * scale), gen


@pytest.mark.parametrize("n,k", [(16, 32), (40, 96), (200, 576)])
@pytest.mark.parametrize("m", [1, 3, 5, 8, 12, 16, 17, 40, 300])
def test_equals_the_dequantized_matmul_of_the_rounded_activations(n: int, k: int, m: int) -> None:
    q, sz, packed, gen = _packed(n, k, n * k + m)
    codes, scales, offsets = packed
    assert codes.shape == (-(-n // 16), k // 32, 256) and codes.dtype == torch.uint8
    x = torch.randn(m, k, generator=gen)
    x[0, :32] = 0.0  # an all-zero group: scale 0, no division by it
    weight = dequantize_int4(q, sz).double()  # q * scale + offset
    scale, zero = sz.double().permute(2, 1, 0)
    offset = (zero - 8 * scale).repeat_interleave(32, dim=1)  # [n, k]
    # the codes' term takes the rounded activations, the offsets' term the exact group sums
    reference = _activations_as_rounded(x) @ (weight - offset).T + x.double() @ offset.T
    got = q4_amx.q4_amx_linear(x, codes, scales, offsets, n)
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert torch.allclose(got.double(), reference, atol=1e-5 * float(reference.abs().max()))
    exact = x.double() @ weight.T  # the activations' rounding: ~1/254 of a group's max each
    assert torch.allclose(got.double(), exact, atol=2e-2 * float(exact.abs().max()))


def test_a_bf16_model_runs_it_and_an_fp32_one_keeps_the_exact_kernel() -> None:
    w = _grid_weight(96, 128, seed=4)
    x = torch.randn(20, 128)
    reference = x.double() @ w.double().T
    for dtype, kernel, tolerance in ((torch.bfloat16, "w4a8", 2e-2), (torch.float32, "q4", 1e-5)):
        layer = repacked_layer(w, dtype, max_int4_tokens=32)
        assert layer.kernel == kernel
        got = layer(x.to(dtype)).double()
        assert torch.allclose(got, reference, atol=tolerance * float(reference.abs().max()))


def test_bf16_activations_read_and_written_as_bf16() -> None:
    """bf16 in, bf16 out (no cast copies around the call): the fp32 result rounded once."""
    _, _, (codes, scales, offsets), gen = _packed(200, 576, 7)
    x = torch.randn(9, 576, generator=gen).to(torch.bfloat16)
    got = q4_amx.q4_amx_linear(x, codes, scales, offsets, 200)
    want = q4_amx.q4_amx_linear(x.float(), codes, scales, offsets, 200)
    assert got.dtype == torch.bfloat16 and got.shape == (9, 200)
    assert torch.equal(got, want.to(torch.bfloat16))


def test_small_steps_keep_the_exact_kernel_beside_it() -> None:
    """Up to `EXACT_ROWS` rows a bf16 model's layer runs the exact kernel (the activations
    as given), above them the W4A8 one."""
    from serving.kernels import q4_linear as q4
    from serving.models.int4 import EXACT_ROWS

    layer = repacked_layer(_grid_weight(96, 128, seed=5), torch.bfloat16, max_int4_tokens=32)
    assert layer.kernel == "w4a8" and layer.codes_exact is not None
    for rows, exact in ((EXACT_ROWS, True), (EXACT_ROWS + 1, False)):
        x = torch.randn(rows, 128).to(torch.bfloat16)
        by_q4 = q4.q4_linear(x, layer.codes_exact, layer.scales, layer.offsets, 96)
        assert torch.equal(layer(x), by_q4.to(torch.bfloat16)) == exact
