"""The fused layer ops (`serving.kernels.fused_ops`) equal the eager torch ops they replace
in a Llama layer: RMSNorm, the residual sum, rotary and the KV write bit for bit (same
rounding to the model's dtype, the RMS statistic summed in torch's order), SiLU within an
ulp of the dtype (std::exp against torch's Sleef exp). A failed build fails these tests
rather than skipping them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from serving.kernels import fused_ops
from serving.models.attention import write_kv
from serving.models.rope import apply_rope

H, HKV, D, HIDDEN, INTER = 9, 3, 64, 576, 1536
ROWS = [1, 3, 28, 29, 300]  # one task, and split between threads


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    assert fused_ops.kernel_available(), "the fused ops kernel did not build (see the warning)"


def _eager_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * F.rms_norm(x.float(), w.shape, eps=eps).to(x.dtype)


def _ulp_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """An ulp of the dtype at each of the two roundings the ops make (the statistic or the
    exp may land a value on the neighbouring bf16, and the product after it rounds again),
    plus a tiny absolute floor near zero."""
    rtol = 2**-6 if actual.dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("dtype", fused_ops.DTYPES)
@pytest.mark.parametrize("rows", ROWS)
# widths: SmolLM2's 576 and others, with and without a tail past whole vectors
@pytest.mark.parametrize("hidden", [HIDDEN, 64, 100, 960, 2048, 4096, 5000])
def test_rms_norm_and_add_rms_norm_bit_for_bit(dtype: torch.dtype, rows: int, hidden: int) -> None:
    gen = torch.Generator().manual_seed(rows * hidden)
    x = (torch.randn(rows, hidden, generator=gen) * 3).to(dtype)
    res = torch.randn(rows, hidden, generator=gen).to(dtype)
    w = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    assert torch.equal(fused_ops.rms_norm(x, w, 1e-5), _eager_rms_norm(x, w, 1e-5))
    normed, total = fused_ops.add_rms_norm(x, res, w, 1e-5)
    assert torch.equal(total, res + x)
    assert torch.equal(normed, _eager_rms_norm(res + x, w, 1e-5))


@pytest.mark.parametrize("dtype", fused_ops.DTYPES)
@pytest.mark.parametrize("rows", ROWS)
def test_silu_and_mul(dtype: torch.dtype, rows: int) -> None:
    gate_up = torch.randn(rows, 2 * INTER, generator=torch.Generator().manual_seed(rows)) * 4
    gate_up = gate_up.to(dtype)
    gate, up = gate_up.split(INTER, dim=-1)
    _ulp_close(fused_ops.silu_and_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", fused_ops.DTYPES)
@pytest.mark.parametrize("cache_dtype", fused_ops.DTYPES)
@pytest.mark.parametrize("rows", ROWS)
def test_rope_qkv_write_equals_eager(
    dtype: torch.dtype, cache_dtype: torch.dtype, rows: int
) -> None:
    gen = torch.Generator().manual_seed(rows)
    qkv = torch.randn(rows, (H + 2 * HKV) * D, generator=gen).to(dtype)
    angles = torch.rand(rows, 1, D // 2, generator=gen) * 100
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(dtype)
    num_blocks, block = 40, 16
    slots = torch.randperm(num_blocks * block, generator=gen)[:rows]
    eager_cache = torch.randn(2, num_blocks, block, HKV, D, generator=gen).to(cache_dtype)
    fused_cache = eager_cache.clone()

    q, k, v = qkv.split([H * D, HKV * D, HKV * D], dim=-1)
    q = apply_rope(q.reshape(rows, H, D), cos, sin)
    k = apply_rope(k.reshape(rows, HKV, D), cos, sin)
    v = v.reshape(rows, HKV, D)
    write_kv(eager_cache, k, v, slots)

    fq, fk, fv = fused_ops.rope_qkv_write(qkv, cos, sin, fused_cache, slots, H, HKV)
    assert torch.equal(fq, q) and torch.equal(fk, k) and torch.equal(fv, v)
    assert torch.equal(fused_cache, eager_cache)  # written slots, and nothing else touched


def test_rope_qkv_write_refuses_a_slot_outside_the_cache() -> None:
    qkv = torch.zeros(2, (H + 2 * HKV) * D)
    cos = sin = torch.zeros(2, 1, D)
    cache = torch.zeros(2, 4, 16, HKV, D)
    with pytest.raises(RuntimeError, match="slot out of range"):
        fused_ops.rope_qkv_write(qkv, cos, sin, cache, torch.tensor([0, 64]), H, HKV)
