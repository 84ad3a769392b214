"""`model.weights`: the int8/int4 quantizers' error bounds, their layers against the
dequantized matmul, a tiny random Llama in every format against its fp32 self, and the
on-disk cache of quantized tensors (reused, and invalidated when the weights change)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from serving.engine.model_runner import ModelRunner
from serving.engine.scheduler import SchedulerOutput
from serving.eval.cli import parse_weights
from serving.kernels import q8_linear as q8
from serving.models import weight_formats
from serving.models.int4 import HybridInt4Linear, int4_kernel_available
from serving.models.int8 import Int8Linear
from serving.models.loader import load_model
from serving.models.q8_head import Q8Head
from serving.models.weight_quant import (
    dequantize_int4,
    dequantize_int8,
    quantize_int4_groups,
    quantize_int8_per_channel,
)
from tests.unit.runner_checks import seq_with_blocks

needs_kernels = pytest.mark.skipif(
    not (int4_kernel_available() and q8.kernel_available()), reason="no int4 or int8 kernel"
)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch) -> None:
    """Quantized weights cached in a fresh folder, never the box's; kernel crossovers fixed
    at 4 rows instead of timed (deterministic: decode steps here take the kernels), and
    never written to the machine's kernels.json from a tiny test shape."""
    from serving.models import int8, q8_head

    monkeypatch.setattr(weight_formats.weight_cache, "cache_dir", lambda: tmp_path / "quantized")
    for module in (int8, q8_head):
        monkeypatch.setattr(
            module, "measured_once", lambda measures, _what: dict.fromkeys(measures, 4)
        )


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    w[0, 0] = 0.9  # an outlier: its row's int8 step, its group's int4 step grow with it
    return w


def test_int8_per_channel_round_trip_within_half_a_step() -> None:
    w = _weight(96, 128)
    codes, scales = quantize_int8_per_channel(w)
    assert codes.dtype == torch.int8 and scales.shape == (96,)
    assert codes.abs().max() == 127  # each row's largest weight uses the full range
    err = (dequantize_int8(codes, scales) - w).abs().amax(dim=1)
    assert torch.all(err <= scales / 2 * (1 + 1e-5))
    # per channel: the outlier's row pays for it, the others keep their own fine step
    assert scales[0] > 3 * scales[1:].max()


def test_int8_all_zero_row_stays_zero() -> None:
    w = _weight(8, 64)
    w[3] = 0
    codes, scales = quantize_int8_per_channel(w)
    assert scales[3] == 0 and torch.all(dequantize_int8(codes, scales)[3] == 0)


@pytest.mark.parametrize("group", [32, 64])
def test_int4_groupwise_round_trip_within_half_a_step(group: int) -> None:
    w = _weight(96, 192)
    q, sz = quantize_int4_groups(w, group)
    assert q.min() >= 0 and q.max() <= 15 and sz.shape == (192 // group, 96, 2)
    groups = w.view(96, 192 // group, group)
    step = (groups.amax(-1) - groups.amin(-1)) / 15  # [N, K/g]
    err = (dequantize_int4(q, sz) - w).view_as(groups).abs().amax(-1)
    # half a step, plus the bf16 rounding of the stored zero (2^-9 of it, relative)
    zero_rounding = sz[..., 1].float().t().abs() * 2**-8
    assert torch.all(err <= step / 2 * 1.01 + zero_rounding)


def test_int4_refuses_a_group_that_does_not_divide_the_inputs() -> None:
    with pytest.raises(ValueError):
        quantize_int4_groups(_weight(8, 96), 64)


def _reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.float() @ w.t()
    return out if bias is None else out + bias.float()


@needs_kernels
@pytest.mark.parametrize("group", [32, 64])
def test_int4_layer_equals_the_dequantized_matmul(group: int) -> None:
    w = _weight(96, 192, seed=1)
    q, sz = quantize_int4_groups(w, group)
    deq = dequantize_int4(q, sz)
    linear = nn.Linear(192, 96, bias=False).to(torch.bfloat16)
    linear.weight.data = deq.to(torch.bfloat16)
    layer = HybridInt4Linear(linear, q, sz, max_int4_tokens=8, group_size=group)
    x = torch.randn(3, 192, dtype=torch.bfloat16)
    ref = _reference(x, deq, None)
    # the kernel: bf16 activations (exact here) and bf16 output rounding, nothing more; the
    # W4A8 kernel (group 32, on a CPU with AMX or VNNI) rounds activations to int8 per group
    # of 32 as well, each by up to 1/254 of its group's max (tests/unit/test_q4_amx_kernel.py checks
    # that rounding exactly)
    tolerance = 0.02 if layer.kernel == "w4a8" and layer.codes_exact is None else 0.01
    assert (layer(x).float() - ref).abs().max() <= tolerance * ref.abs().max()
    big = torch.randn(9, 192, dtype=torch.bfloat16)  # above 8 tokens: the dense path
    assert (layer(big).float() - _reference(big, deq, None)).abs().max() <= 0.01 * ref.abs().max()


@needs_kernels
def test_int8_layer_equals_the_dequantized_matmul() -> None:
    w = _weight(96, 128, seed=2)
    codes, scales = quantize_int8_per_channel(w)
    deq = dequantize_int8(codes, scales)
    linear = nn.Linear(128, 96).to(torch.bfloat16)
    linear.weight.data = deq.to(torch.bfloat16)
    layer = Int8Linear(linear, codes, scales, max_rows=4)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16  # a layer answers in its input's dtype
    ref = _reference(x, deq, linear.bias)
    # fp32 sums of exact weights: only the bf16 rounding of the output
    assert (out.float() - ref).abs().max() <= 0.01 * ref.abs().max()
    big = torch.randn(5, 128, dtype=torch.bfloat16)  # above max_rows: the dense layer
    assert torch.equal(layer(big), linear(big))


# --- a tiny random Llama in every format -------------------------------------------------

VOCAB = 256
# ‖logits − reference‖ / ‖reference‖ over every decode step of the bf16 model (kernels for
# the decode steps). Against the fp32 model on the same (dequantized) weights: only bf16
# rounding, measured 1.5 %; a wrong scale, zero or layout is off by 100 % or more. The W4A8
# int4 kernel (a bf16 model's int4 layers on a CPU with AMX or VNNI, above `EXACT_ROWS` rows,
# or at every size where the exact kernel is missing) rounds activations to int8 per group of 32
# as well, as llama.cpp does: 3.8 % on these random weights (+1.1 % perplexity on SmolLM2
# where every step runs it, benchmarks/results/2026-12-06/int4-amx).
SAME_WEIGHTS_TOL = 0.03
SAME_WEIGHTS_TOL_AMX_INT4 = 0.05
# Against the fp32 model on the original weights: the quantization's own cost on random
# Gaussian weights (no structure to spare, every error amplified through the layers),
# measured 1.5 % (auto, bf16), 2.7-3.0 % (int8), 29-30 % (int4, group 32).
REL_TOL = {"auto": 0.03, "bf16": 0.03, "int8": 0.05, "int4": 0.45}


def _tiny_llama(folder: Path, tied: bool) -> None:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights large enough that the logits spread out
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.08 * noise)
    model.save_pretrained(folder, safe_serialization=True)


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny_folder(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama")
    _tiny_llama(folder, tied=request.param)
    return folder


def _decode_logits(model: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """Logits of two sequences fed a 3-token prefill, then one token per step each: decode
    steps of 2 rows, which run the int8/int4 kernels."""
    runner = ModelRunner(model, 32, 4, dtype)
    gen = torch.Generator().manual_seed(3)
    a = seq_with_blocks(
        "a", torch.randint(3, VOCAB, (20,), generator=gen).tolist(), [5, 1, 9, 3, 7]
    )
    b = seq_with_blocks("b", torch.randint(3, VOCAB, (14,), generator=gen).tolist(), [0, 8, 2, 6])
    runner.execute(SchedulerOutput([a, b], [3, 3], is_prefill=True))
    a.num_computed_tokens = b.num_computed_tokens = 3
    rows = []
    while live := [s for s in (a, b) if s.num_computed_tokens < len(s.prompt_token_ids)]:
        rows.append(runner.execute(SchedulerOutput(live, [1] * len(live), is_prefill=False)))
        for s in live:
            s.num_computed_tokens += 1
    return torch.cat(rows).float()


@needs_kernels
@pytest.mark.parametrize("weights", ["auto", "bf16", "int8", "int4"])
def test_tiny_llama_in_every_format_is_close_to_fp32(tiny_folder: Path, weights: str) -> None:
    reference = _decode_logits(load_model(tiny_folder, torch.float32), torch.float32)
    model = load_model(tiny_folder, torch.bfloat16, int4_max_tokens=8, weights=weights)
    kinds = [type(m) for m in model.modules()]
    if weights == "int8":
        assert kinds.count(Int8Linear) == 8 and type(model.lm_head) is Q8Head
    elif weights == "int4":  # qkv stays int8 (`INT8_LAYERS`), the other 3 linears of 2 layers int4
        assert kinds.count(HybridInt4Linear) == 6 and kinds.count(Int8Linear) == 2
        assert type(model.lm_head) is Q8Head
        assert all(m.group_size == 32 for m in model.modules() if type(m) is HybridInt4Linear)
    else:  # random weights are on no GGUF grid: auto is dense, as bf16 always is
        assert HybridInt4Linear not in kinds and Int8Linear not in kinds
    got = _decode_logits(model, torch.bfloat16)
    same_weights = _decode_logits(
        load_model(tiny_folder, torch.float32, weights=weights), torch.float32
    )
    amx = any(  # the W4A8 kernel with no exact kernel for small steps beside it
        m.kernel == "w4a8" and m.codes_exact is None
        for m in model.modules()
        if type(m) is HybridInt4Linear
    )
    assert _rel(got, same_weights) < (SAME_WEIGHTS_TOL_AMX_INT4 if amx else SAME_WEIGHTS_TOL)
    assert _rel(got, reference) < REL_TOL[weights]
    assert reference.std() > 0.5  # not vacuous: the logits spread out


def _rel(x: torch.Tensor, reference: torch.Tensor) -> float:
    rel = ((x - reference).norm() / reference.norm()).item()
    print(f"relative logit error {rel:.4f}")  # shown with -s: the numbers REL_TOL quotes
    return rel


@needs_kernels
def test_quantized_model_computes_with_the_quantized_weights_on_every_path(tiny_folder) -> None:
    """Prefill (dense) and decode (kernels) see the same weights: the model's own weights
    are the dequantized ones, so a prefill replica without the kernels agrees too."""
    model = load_model(tiny_folder, torch.float32, weights="int8")
    source = load_model(tiny_folder, torch.float32)
    w, w0 = model.layers[0].mlp.down_proj.weight, source.layers[0].mlp.down_proj.weight
    codes, scales = quantize_int8_per_channel(w0)
    assert torch.equal(w, dequantize_int8(codes, scales))
    assert torch.equal(model.lm_head.weight, model.embed_tokens.weight) or not torch.equal(
        source.lm_head.weight, source.embed_tokens.weight
    )


def test_default_model_bf16_weights_are_dense_only(model_folder: Path) -> None:
    """`bf16` takes neither the GGUF-grid int4 repack nor the Q8_0 head `auto` takes."""
    model = load_model(
        model_folder, torch.bfloat16, max_positions=64, int4_max_tokens=8, weights="bf16"
    )
    assert not any(isinstance(m, (HybridInt4Linear, Q8Head)) for m in model.modules())


# --- the cache --------------------------------------------------------------------------


def test_second_load_reuses_the_cache_and_a_changed_model_misses(tiny_folder, monkeypatch) -> None:
    calls = []
    quantize = weight_formats.quantize_tensors

    def counting(*args, **kwargs):
        calls.append(args[1])
        return quantize(*args, **kwargs)

    monkeypatch.setattr(weight_formats, "quantize_tensors", counting)
    first = load_model(tiny_folder, torch.float32, weights="int4")
    assert calls == ["int4"]
    second = load_model(tiny_folder, torch.float32, weights="int4")
    assert calls == ["int4"]  # not quantized again
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    load_model(tiny_folder, torch.float32, weights="int8")  # another format: its own entry
    assert calls == ["int4", "int8"]
    weights_file = tiny_folder / "model.safetensors"
    stat = weights_file.stat()
    os.utime(weights_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # "re-converted"
    load_model(tiny_folder, torch.float32, weights="int4")
    assert calls == ["int4", "int8", "int4"]
    cached = sorted(p.name for p in weight_formats.weight_cache.cache_dir().iterdir())
    assert len(cached) == 2  # the stale int4 entry was replaced, not kept beside the new one


def test_eval_compares_quantized_weights_with_the_dense_reference_first() -> None:
    assert parse_weights("int8,int4") == ["bf16", "int8", "int4"]
    assert parse_weights("int4,bf16") == ["bf16", "int4"]
    assert parse_weights("auto") == ["auto"]
    with pytest.raises(ValueError):
        parse_weights("fp8")


def test_eval_cli_reports_the_quality_cost_of_int8(tmp_path: Path, model_folder: Path) -> None:
    """`inferos eval ppl --weights int8`: the dense reference, then int8 with its ΔPPL."""
    import json

    from serving.cli import main

    text = Path(__file__).resolve().parents[2] / "README.md"
    out = tmp_path / "ppl.json"
    args = ["eval", "ppl", "--text", str(text), "--profile", "baseline", "--context", "64"]
    assert main([*args, "--max-tokens", "128", "--weights", "int8", "--out", str(out)]) == 0
    reference, int8 = json.loads(out.read_text())
    assert (reference["weights"], int8["weights"]) == ("bf16", "int8")
    assert int8["weights_reference_ppl"] == reference["ppl"]
    cost = int8["weights_delta_ppl_pct"]
    assert cost == pytest.approx(100 * (int8["ppl"] / reference["ppl"] - 1))
    assert 0 < abs(cost) < 5  # int8 changes the numbers, slightly
