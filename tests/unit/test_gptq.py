"""GPTQ for `model.weights: int4`: the sweep's layout and its limits (no input correlation:
round-to-nearest exactly; unseen inputs: zero), that it lowers the layer's output error on
correlated inputs, the sequential calibration over a model's layers, and the product path
(`int4_calibration`) against round-to-nearest on a tiny random Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from serving.models import calibration, weight_formats
from serving.models.calibration import calibration_windows, quantize_sequentially
from serving.models.gptq import gptq_int4, mse_group_params
from serving.models.loader import load_model
from serving.models.weight_quant import dequantize_int4, int4_group_params, quantize_int4_groups
from tests.unit.test_weight_formats import VOCAB, _decode_logits, _rel, _tiny_llama


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(weight_formats.weight_cache, "cache_dir", lambda: tmp_path / "quantized")


def _correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """`n` draws of inputs whose channels are strongly correlated (8 latent factors, mixed
    the same way for every seed, plus noise), as a transformer's normalized hidden states
    are."""
    mixing = torch.randn(8, k, generator=torch.Generator().manual_seed(100))
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=gen) @ mixing + 0.3 * torch.randn(n, k, generator=gen)


def _weight(n: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_layout_is_the_int4_kernels() -> None:
    w, x = _weight(48, 96), _correlated_inputs(512, 96)
    q, sz = gptq_int4(w, x.T @ x, 32)
    assert q.dtype == torch.int32 and q.shape == (48, 96) and 0 <= q.min() and q.max() <= 15
    assert sz.dtype == torch.bfloat16 and sz.shape == (3, 48, 2)
    with pytest.raises(ValueError, match="multiple of the group size"):
        gptq_int4(_weight(4, 48), torch.eye(48), 32)


def test_uncorrelated_inputs_give_round_to_nearest_exactly() -> None:
    """With H diagonal no error has anywhere to go: GPTQ is round-to-nearest."""
    w = _weight(64, 128)
    scales = torch.linspace(0.5, 2.0, 128)
    q, sz = gptq_int4(w, torch.diag(scales), 32)
    q0, sz0 = quantize_int4_groups(w, 32)
    assert torch.equal(q, q0) and torch.equal(sz, sz0)


def test_inputs_never_seen_get_zero_weight() -> None:
    w, x = _weight(16, 64), _correlated_inputs(256, 64)
    x[:, 5] = 0
    q, sz = gptq_int4(w, x.T @ x, 32)
    step = sz[0, :, 0].float()  # column 5 is in group 0
    assert torch.all(dequantize_int4(q, sz)[:, 5].abs() <= 0.6 * step)  # 0 on the grid


def test_output_error_is_well_below_round_to_nearest_on_correlated_inputs() -> None:
    w = _weight(128, 256)
    calib, held_out = _correlated_inputs(2048, 256, seed=2), _correlated_inputs(512, 256, seed=3)
    gptq = dequantize_int4(*gptq_int4(w, calib.T @ calib, 32))
    rtn = dequantize_int4(*quantize_int4_groups(w, 32))
    err_gptq = (held_out @ (gptq - w).T).norm()
    err_rtn = (held_out @ (rtn - w).T).norm()
    assert err_gptq < 0.6 * err_rtn  # measured 0.3-0.4x
    # the weights themselves move further than round-to-nearest moves them: the trade
    assert (gptq - w).norm() > (rtn - w).norm()


def test_calibration_windows_spread_over_the_text() -> None:
    windows = calibration_windows(list(range(10_000)), window=100, count=10)
    assert len(windows) == 10 and all(len(w) == 100 for w in windows)
    assert windows[0][0] == 0 and windows[-1][0] == 9_000
    assert len(calibration_windows(list(range(250)), window=100, count=10)) == 2
    with pytest.raises(ValueError, match="fewer than"):
        calibration_windows(list(range(50)), window=100)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama_gptq")
    _tiny_llama(folder, tied=True)
    return folder


def _random_windows(count: int = 16, length: int = 64, seed: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (length,), generator=gen) for _ in range(count)]


def test_layers_are_calibrated_in_order_on_the_quantized_layers_before(tiny_folder) -> None:
    """Every decoder linear is quantized once, layer 0's before layer 1's, and layer 1's
    inputs are what layer 0 computes with its quantized weights."""
    windows = _random_windows(4, 32)

    def moments_when(zero_layer0: bool) -> tuple[list[str], dict[str, torch.Tensor]]:
        model = load_model(tiny_folder, torch.float32)
        order, seen = [], {}

        def quantize(key: str, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
            order.append(key)
            seen[key] = h.clone()
            assert h.shape == (w.shape[1], w.shape[1]) and torch.allclose(h, h.T, atol=1e-3)
            return torch.zeros_like(w) if zero_layer0 and key.startswith("layers.0.") else w

        quantize_sequentially(model, windows, quantize)
        return order, seen

    order, plain = moments_when(False)
    linears = [
        n for n, m in load_model(tiny_folder, torch.float32).named_modules() if type(m) is nn.Linear
    ]
    assert sorted(order) == sorted(n for n in linears if n.startswith("layers."))
    assert max(i for i, k in enumerate(order) if k.startswith("layers.0.")) < min(
        i for i, k in enumerate(order) if k.startswith("layers.1.")
    )
    _, zeroed = moments_when(True)
    assert torch.equal(plain["layers.0.self_attn.qkv_proj"], zeroed["layers.0.self_attn.qkv_proj"])
    assert not torch.allclose(
        plain["layers.1.self_attn.qkv_proj"], zeroed["layers.1.self_attn.qkv_proj"]
    )


def test_calibrated_int4_model_is_closer_to_fp32_than_round_to_nearest(
    tiny_folder: Path, tmp_path: Path, monkeypatch
) -> None:
    """The product path: `int4_calibration` quantizes by GPTQ (its own cache entry), and the
    model's logits on unseen tokens sit closer to the fp32 model's than round-to-nearest's."""
    text = tmp_path / "calibration.txt"
    text.write_text("calibration text")  # its bytes key the cache; windows come from below
    monkeypatch.setattr(weight_formats, "windows_from_text", lambda *_: _random_windows())
    reference = _decode_logits(load_model(tiny_folder, torch.float32), torch.float32)
    rtn = _decode_logits(load_model(tiny_folder, torch.float32, weights="int4"), torch.float32)
    recipe = weight_formats.Int4Recipe(calibration=text)
    gptq_model = load_model(tiny_folder, torch.float32, weights="int4", int4=recipe)
    gptq = _decode_logits(gptq_model, torch.float32)
    # measured 0.85x (random weights and tokens: little correlation for GPTQ to use)
    assert _rel(gptq, reference) < 0.92 * _rel(rtn, reference)
    cached = sorted(p.name for p in weight_formats.weight_cache.cache_dir().iterdir())
    assert len(cached) == 2 and sum("-gptq-" in name.split(".", 1)[1] for name in cached) == 1
    assert calibration.WINDOW >= 64  # the product's windows are longer than the test's


def test_recipe_keeps_qkv_and_the_head_int8_and_names_its_cache_entry(tmp_path: Path) -> None:
    recipe = weight_formats.Int4Recipe()
    assert recipe.keeps_int8("layers.3.self_attn.qkv_proj.weight")
    assert recipe.keeps_int8("lm_head.weight")
    assert not recipe.keeps_int8("layers.3.mlp.down_proj.weight")
    assert not weight_formats.Int4Recipe(int8_layers=()).keeps_int8(
        "layers.0.self_attn.qkv_proj.weight"
    )
    text = tmp_path / "calib.txt"
    text.write_text("a")
    a = weight_formats.Int4Recipe(calibration=text).tag()
    text.write_text("b")
    assert a != weight_formats.Int4Recipe(calibration=text).tag()  # the text's bytes count
    assert weight_formats.Int4Recipe().tag() != weight_formats.Int4Recipe(int8_layers=()).tag()


def test_config_refuses_a_calibration_without_int4_or_without_a_file(tmp_path: Path) -> None:
    from serving.config import ModelSettings

    text = tmp_path / "calib.txt"
    text.write_text("some text")
    assert ModelSettings(weights="int4", int4_calibration=text).int4_recipe().calibration == text
    with pytest.raises(ValueError, match="calibrates int4 weights"):
        ModelSettings(weights="int8", int4_calibration=text)
    with pytest.raises(ValueError, match="no such file"):
        ModelSettings(weights="int4", int4_calibration=tmp_path / "missing.txt")


def test_searched_group_ranges_round_no_worse_than_min_max() -> None:
    groups = _weight(64, 96).view(64, 3, 32)
    groups[0, 0, 0] = 0.6  # an outlier: shrinking its group's range pays elsewhere
    for params in (mse_group_params, int4_group_params):
        scale, zero = params(groups)
        assert scale.shape == zero.shape == (64, 3)

    def err(scale, zero):
        codes = torch.round((groups - zero[..., None]) / scale[..., None] + 8).clamp(0, 15)
        return ((codes - 8) * scale[..., None] + zero[..., None] - groups).pow(2).sum(-1)

    searched, min_max = err(*mse_group_params(groups)), err(*int4_group_params(groups))
    assert torch.all(searched <= min_max * (1 + 1e-6))
    assert searched.sum() < 0.9 * min_max.sum()
