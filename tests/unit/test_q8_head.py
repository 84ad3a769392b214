"""The int8 LM head: Q8_0-grid detection is exact, the C++ kernel equals an fp32 matmul of
the same weights, and the head switches to its dense module above its row count. The
kernel must build here (g++ is on every machine we run on): a failed build fails."""

from __future__ import annotations

import pytest
import torch

from serving.kernels import q8_linear as q8
from serving.models.q8_head import Q8Head


def _q8_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A weight on a Q8_0 grid as GGUF writes it: int8 codes times an fp16 scale per 32."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int32)
    codes[:, ::32] = 127  # each group's largest code is ±127, as Q8_0's d = amax / 127 gives
    scales = (torch.rand(n, k // 32, generator=gen) * 0.01).half().float()
    return (codes.float().view(n, k // 32, 32) * scales[..., None]).view(n, k)


def test_grid_detection_is_exact_and_refuses_off_grid_weights() -> None:
    w = _q8_weight(40, 96)
    packed = q8.quantize_on_q8_grid(w)
    assert packed is not None
    codes, scales = packed
    assert codes.dtype == torch.int8 and scales.shape == (40, 3)
    assert torch.equal(codes.float().view(40, 3, 32) * scales[..., None], w.view(40, 3, 32))
    assert q8.quantize_on_q8_grid(w + 1e-4) is None
    assert q8.quantize_on_q8_grid(torch.randn(8, 40)) is None  # K not a multiple of 32


@pytest.mark.parametrize("n", [16, 50, 4096])  # 50: the last tile is padded
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 17, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_the_fp32_matmul(n: int, rows: int, dtype: torch.dtype) -> None:
    assert q8.kernel_available(), "the q8_linear kernel did not build"
    w = _q8_weight(n, 576, seed=n)
    codes, scales = q8.quantize_on_q8_grid(w)
    packed_codes, packed_scales = q8.pack_tiles(codes, scales)
    x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows)).to(dtype)
    out = q8.q8_linear(x, packed_codes, packed_scales, n)
    expected = x.float() @ w.t()  # fp32 sums of the same weights: only summation order differs
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_head_uses_the_kernel_up_to_its_row_count_then_the_dense_module() -> None:
    assert q8.kernel_available(), "the q8_linear kernel did not build"
    w = _q8_weight(64, 64)
    dense = torch.nn.Linear(64, 64, bias=False)
    dense.weight.data = w.to(torch.bfloat16)
    head = Q8Head(dense, *q8.quantize_on_q8_grid(w))
    head.max_q8_rows = 2
    assert head.weight is dense.weight  # the speculative proposers slice it
    x = torch.randn(3, 64).to(torch.bfloat16)
    assert head(x[:2]).dtype == torch.float32  # the kernel: fp32 sums
    assert torch.equal(head(x), dense(x))  # above the row count: the dense module itself


def test_the_default_models_head_lies_on_the_q8_grid(model_folder) -> None:
    """SmolLM2's GGUF stores token_embd (the tied head) as Q8_0: converted to fp32 it must
    still be exactly codes * scales, or the int8 head silently never engages."""
    from safetensors import safe_open

    with safe_open(str(model_folder / "model.safetensors"), "pt") as f:
        weight = f.get_tensor("model.embed_tokens.weight")
    assert q8.quantize_on_q8_grid(weight) is not None
