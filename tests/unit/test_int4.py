"""The int4 repack is lossless for weights on a 4-bit grid and refuses anything else."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from serving.models.int4 import (
    HybridInt4Linear,
    int4_kernel_available,
    quantize_on_grid,
    repack_int4,
)

pytestmark = pytest.mark.skipif(not int4_kernel_available(), reason="torch has no int4 CPU kernel")


def _grid_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """A weight built the way Q4_1 dequantizes: min + q * scale per group of 32."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // 32, 32), generator=gen).float()
    q[..., 0], q[..., 1] = 0, 15  # every group spans its whole range, as Q4_1 groups do
    scale = torch.rand(n, k // 32, 1, generator=gen) * 0.05 + 0.01
    lo = -torch.rand(n, k // 32, 1, generator=gen) * 0.4
    return (lo + q * scale).view(n, k)


def repacked_layer(
    w: torch.Tensor, dtype: torch.dtype, max_int4_tokens: int
) -> HybridInt4Linear:
    """One bias-free linear holding the grid weight `w` [N, K] in `dtype`, repacked to int4
    (as the loader does a model's layers from their GGUF-grid source weights)."""
    dense = nn.Linear(w.shape[1], w.shape[0], bias=False)
    dense.weight.data = w.to(dtype)
    model = nn.Sequential(dense)
    assert repack_int4(model, {"0.weight": w}, max_int4_tokens=max_int4_tokens) == 1
    layer = model[0]
    assert isinstance(layer, HybridInt4Linear)
    return layer


def test_grid_weight_round_trips_exactly() -> None:
    w = _grid_weight(64, 128)
    packed = quantize_on_grid(w)
    assert packed is not None
    q, sz = packed
    assert q.min() >= 0 and q.max() <= 15
    scales, zeros = sz[..., 0].t(), sz[..., 1].t()  # [N, K/g]
    recon = (q.view(64, 4, 32).float() - 8) * scales[..., None] + zeros[..., None]
    assert torch.allclose(recon.view(64, 128), w, atol=1e-6)


def test_off_grid_weight_is_refused() -> None:
    w = torch.randn(64, 128)
    assert quantize_on_grid(w) is None


def test_hybrid_linear_matches_dense_and_switches_by_batch() -> None:
    w = _grid_weight(96, 64, seed=1)
    layer = repacked_layer(w, torch.bfloat16, max_int4_tokens=4)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    reference = x.float() @ w.t()
    small = layer(x)  # int4 kernel
    big = layer(torch.cat([x, x, x]))[:3]  # 9 tokens > 4: dense bf16 path
    # both carry only bf16 rounding of activations/scales relative to the fp32 product
    tol = 0.02 * reference.abs().max()
    assert (small.float() - reference).abs().max() < tol
    assert (big.float() - reference).abs().max() < tol


def test_repack_skips_layers_not_on_grid() -> None:
    lin = nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    model = nn.Sequential(lin)
    assert repack_int4(model, {"0.weight": torch.randn(32, 64)}, max_int4_tokens=8) == 0
    assert model[0] is lin


def test_default_model_repacks_every_linear_layer_and_keeps_its_predictions(model_folder) -> None:
    """On SmolLM2 (Q4_1 source) all 120 linear layers repack, and a decode step on the int4
    path predicts what the dense bf16 path predicts."""
    from serving.engine.engine import EngineConfig, LLMEngine
    from serving.engine.sampling_params import SamplingParams
    from serving.engine.sequence import Sequence
    from serving.models.loader import load_model

    dense = load_model(model_folder, torch.bfloat16, max_positions=512)
    packed = load_model(model_folder, torch.bfloat16, max_positions=512, int4_max_tokens=8)
    assert sum(isinstance(m, HybridInt4Linear) for m in packed.modules()) == 120
    assert not any(isinstance(m, HybridInt4Linear) for m in dense.modules())

    def next_token_logits(model) -> torch.Tensor:
        engine = LLMEngine(model, EngineConfig(num_blocks=16, kv_dtype="bfloat16"), (2,))
        prompts = [list(range(200, 260)), list(range(900, 930)), list(range(4000, 4045))]
        for i, ids in enumerate(prompts):
            engine.add_request(Sequence(f"r{i}", ids, SamplingParams(max_tokens=3, temperature=0)))
        engine.step()  # prefill (dense in both: more than 8 tokens)
        batch = engine.scheduler.schedule()  # the 3-sequence decode step: int4 in `packed`
        with torch.inference_mode():
            return engine.runner.execute(batch)

    expected, got = next_token_logits(dense), next_token_logits(packed)
    assert torch.equal(expected.argmax(-1), got.argmax(-1))
    # bf16 rounding of activations and of the group scales, nothing more (3 rows: the
    # exact kernel on every CPU, `EXACT_ROWS`)
    assert (expected - got).abs().max() < 0.05 * expected.abs().max()


def test_measured_int4_count_is_a_bucket_within_the_cap_and_restores_the_layer() -> None:
    from serving.models.int4 import INT4_BUCKETS, measure_max_int4_tokens

    layers = []
    for seed, max_tokens in ((0, 8), (1, 2)):  # a shape's layers, timed in turn
        w = _grid_weight(64, 64, seed=seed)
        layer = HybridInt4Linear(nn.Linear(64, 64, bias=False), *quantize_on_grid(w), max_tokens)
        layer.weight.data = w.to(torch.bfloat16)
        layers.append(layer)
    got = measure_max_int4_tokens(layers, torch.bfloat16, cap=4)
    assert got == 0 or (got in INT4_BUCKETS and got <= 4)
    # measuring leaves the layers as they were
    assert [m.max_int4_tokens for m in layers] == [8, 2]


def test_every_layer_of_a_shape_gets_its_shapes_measured_count(monkeypatch) -> None:
    from serving.models import dense_kernels, int4

    model = nn.Sequential(*(nn.Linear(64, 64, bias=False) for _ in range(3)))
    source = {f"{i}.weight": _grid_weight(64, 64, seed=i) for i in range(3)}
    assert repack_int4(model, source, max_int4_tokens=8) == 3
    calls = []

    def fake_measured_once(measures, what):
        calls.append(sorted(measures))
        return {key: 2 for key in measures}

    monkeypatch.setattr(dense_kernels, "measured_once", fake_measured_once)
    int4.use_measured_int4(model, torch.bfloat16, cap=8)
    assert len(calls) == 1 and len(calls[0]) == 1  # one shape, measured once
    assert [m.max_int4_tokens for m in model] == [2, 2, 2]
