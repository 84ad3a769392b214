"""DenseLinear switches between bf16 and fp32 at its threshold and computes the same
product either way (up to bf16 rounding); the measurement yields a bucket or NEVER."""

from __future__ import annotations

from pathlib import Path

import torch

from serving.models.dense_kernels import BUCKETS, NEVER, DenseLinear, measure_fp32_min_tokens


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.float() @ w.float().t()


def test_bf16_model_runs_fp32_from_the_threshold() -> None:
    gen = torch.Generator().manual_seed(0)
    source = torch.randn(48, 32, generator=gen)
    layer = DenseLinear(source.to(torch.bfloat16), None, fp32_min_tokens=4, source=source)
    assert layer.weight32 is not None and layer.weight16 is None
    small = torch.randn(3, 32, generator=gen).to(torch.bfloat16)
    big = torch.randn(5, 32, generator=gen).to(torch.bfloat16)
    out_small, out_big = layer(small), layer(big)
    assert out_small.dtype == out_big.dtype == torch.bfloat16
    # the fp32 path multiplies the source weight: only the output's bf16 rounding remains
    exact = _reference(big, source)
    assert (out_big.float() - exact).abs().max() <= 0.01 * exact.abs().max()
    rounded = _reference(small, source.to(torch.bfloat16))
    assert (out_small.float() - rounded).abs().max() <= 0.02 * rounded.abs().max()


def test_fp32_model_runs_bf16_below_the_threshold_and_exact_fp32_above() -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(40, 24, generator=gen)
    layer = DenseLinear(torch.nn.Parameter(w), None, fp32_min_tokens=8)
    assert layer.weight16 is not None and layer.weight32 is None
    x = torch.randn(8, 24, generator=gen)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, w))  # fp32: untouched
    out = layer(x[:2])
    assert out.dtype == torch.float32
    exact = _reference(x[:2], w)
    assert (out - exact).abs().max() <= 0.02 * exact.abs().max()


def test_never_keeps_no_copy() -> None:
    w = torch.randn(8, 8).to(torch.bfloat16)
    layer = DenseLinear(w, None, NEVER)
    assert layer.weight32 is None and layer.weight16 is None
    x = torch.randn(2, 8).to(torch.bfloat16)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, w))


def test_measurement_returns_a_bucket_or_never() -> None:
    assert measure_fp32_min_tokens(64, 32, torch.bfloat16) in (*BUCKETS, NEVER)


def test_native_bf16_never_switches_and_measures_nothing(monkeypatch) -> None:
    """On a CPU that multiplies bf16 natively no shape switches to fp32, whatever a noisy
    measurement would have said: `measure_fp32_min_tokens` must not even run."""
    from serving.models import dense_kernels

    monkeypatch.setattr("serving.config.cpu_has_native_bf16", lambda: True)

    def _no_measure(*_args: object) -> int:
        raise AssertionError("measured on a native-bf16 CPU")

    monkeypatch.setattr(dense_kernels, "measure_fp32_min_tokens", _no_measure)
    shapes = {(64, 32), (3072, 576)}
    assert dense_kernels.fp32_thresholds(shapes, torch.bfloat16) == dict.fromkeys(shapes, NEVER)


def test_cache_key_names_the_isa(monkeypatch) -> None:
    """Two CPUs of one model name but different ISAs (Zen 3 AVX2, Zen 4 AVX-512-BF16) must
    not share a verdict."""
    from serving.models import dense_kernels

    monkeypatch.setattr("serving.config.cpu_has_native_bf16", lambda: True)
    native = dense_kernels.cache_key(torch.bfloat16, 8, 8)
    monkeypatch.setattr("serving.config.cpu_has_native_bf16", lambda: False)
    assert dense_kernels.cache_key(torch.bfloat16, 8, 8) != native


def test_prepacked_bf16_path_is_bit_identical_to_f_linear() -> None:
    """The oneDNN-prepacked weight runs the same kernel as F.linear without its per-call
    reorder: the same bits at every row count, with and without a bias. Where bf16 is
    native the layer must actually take that path."""
    from serving.config import cpu_has_native_bf16

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(96, 64, generator=gen).to(torch.bfloat16)
    b = torch.randn(96, generator=gen).to(torch.bfloat16)
    for bias in (None, b):
        layer = DenseLinear(w, bias, NEVER)
        if cpu_has_native_bf16() and torch.backends.mkldnn.is_available():
            assert layer.packed16 is not None
        for rows in (1, 3, 9, 32, 77, 512):
            x = torch.randn(rows, 64, generator=gen).to(torch.bfloat16)
            assert torch.equal(layer(x), torch.nn.functional.linear(x, w, bias))


def test_winning_bucket_needs_the_margin_and_evicts_as_asked() -> None:
    """`fast` must beat `dense` by `margin` at every bucket; the eviction buffer asked for
    (here 2 MiB past the default) is written before every timed run."""
    import time

    from serving.models.dense_kernels import EVICT_BYTES, largest_winning_bucket

    def sleeper(ms: float):
        return lambda x: time.sleep(ms / 1e3)

    buckets = (1, 2, 4)
    fast, dense = sleeper(1.0), sleeper(10.0)
    assert largest_winning_bucket(buckets, 8, torch.float32, fast, dense, margin=2.0) == 4
    assert largest_winning_bucket(buckets, 8, torch.float32, fast, dense, margin=20.0) == 0
    bigger = EVICT_BYTES + 2 * 2**20
    assert largest_winning_bucket(buckets, 8, torch.float32, fast, dense, bigger, 2.0) == 4


def test_last_level_cache_is_read_from_sysfs() -> None:
    from serving.models.dense_kernels import last_level_cache_bytes

    size = last_level_cache_bytes()
    assert size >= 0
    if Path("/sys/devices/system/cpu/cpu0/cache/index0/size").exists():
        assert size >= 2**15  # at least an L1's 32 KiB
