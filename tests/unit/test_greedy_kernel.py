"""The greedy argmax kernel (`serving/kernels/greedy.py`) gives torch's argmax exactly:
first index of the maximum, NaN largest, ties and signed zeros, any vocabulary size."""

from __future__ import annotations

import pytest
import torch

from serving.kernels import greedy

pytestmark = pytest.mark.skipif(
    not greedy.kernel_available(), reason="the greedy kernel does not build here (no g++?)"
)


@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 1000, 49152])
@pytest.mark.parametrize("rows", [1, 3, 32])
def test_equals_torch_on_random_logits(rows: int, vocab: int) -> None:
    gen = torch.Generator().manual_seed(rows * 100_003 + vocab)
    logits = torch.randn(rows, vocab, generator=gen)
    assert torch.equal(greedy.argmax_rows(logits), logits.argmax(dim=-1))


def test_ties_nans_infinities_and_signed_zeros_as_torch() -> None:
    vocab = 40
    logits = torch.full((7, vocab), -1.0)
    logits[0, [5, 21, 33]] = 3.0  # tie: the first index
    logits[1, [30, 2]] = float("nan")  # the first NaN wins over everything
    logits[1, 0] = float("inf")
    logits[2] = float("-inf")  # all -inf: index 0
    logits[3, 17] = -0.0  # -0.0 == 0.0: the first of them
    logits[3, 25] = 0.0
    logits[4, 39] = float("inf")  # in the tail past the last full 16 lanes
    logits[5, 36] = float("nan")  # a NaN in the tail only
    logits[6, :] = 0.0  # all equal: index 0
    got = greedy.argmax_rows(logits)
    assert torch.equal(got, logits.argmax(dim=-1))
    assert got.tolist() == [5, 2, 0, 17, 39, 36, 0]


def test_other_layouts_and_dtypes_take_torchs_argmax() -> None:
    logits = torch.randn(6, 50)
    transposed = logits.t().contiguous().t()  # not contiguous
    assert torch.equal(greedy.argmax_rows(transposed), logits.argmax(dim=-1))
    as_bf16 = logits.to(torch.bfloat16)
    assert torch.equal(greedy.argmax_rows(as_bf16), as_bf16.argmax(dim=-1))
