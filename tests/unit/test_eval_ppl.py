"""`inferos eval ppl`: the staged cache stages units as the engine would, the streaming path
is the model's own, and the numbers it reports behave (baseline KLD 0, quantization costs
bytes-for-quality). Real default model, a few hundred tokens."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from policies.kv_levels import BALANCED, BASELINE, SAFE, Level, Profile, live_unit_levels
from serving.cli import main
from serving.eval.ppl import EvalSettings, auto_chunk, evaluate
from serving.eval.staged_cache import StagedCache
from serving.kv.quant import fake_quantize, quantize_block
from serving.models.loader import load_model

TEXT = Path(__file__).resolve().parents[2] / "README.md"  # any real English text
ALL_INT4 = Profile(
    "all-int4", 0, 0, frozenset(Level), l1_importance=1e9, l2_importance=1e9,
    l1_pressure=0.0, l2_pressure=0.0, quant_group_tokens=32,
)  # fmt: skip


def _filled_cache(profile: Profile, num_tokens: int) -> StagedCache:
    cache = StagedCache(2, 3, 64, num_tokens, torch.bfloat16, profile)
    g = torch.Generator().manual_seed(0)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=g))
    return cache


def test_restage_writes_fake_quant_of_originals_and_promotes_back() -> None:
    profile = dataclasses.replace(BALANCED, quant_group_tokens=32, recent_window_tokens=64)
    n = 8 * 32
    cache = _filled_cache(profile, n)
    original = cache.kv.clone()
    assert cache.restage(n, pressure=1.0) > 0
    levels = live_unit_levels([], profile, 1.0, n)
    ub = 2  # blocks per 32-token unit
    for u, level in enumerate(levels):
        blocks = original[:, :, u * ub : (u + 1) * ub]  # [L, 2, ub, bs, H, D]
        now = cache.kv[:, :, u * ub : (u + 1) * ub]
        if level == Level.L0:
            assert torch.equal(now, blocks)
        else:
            unit = blocks.reshape(2, 2, 32, 3, 64)
            bits = {Level.L1: 8, Level.L2: 4}[level]
            assert torch.equal(now.reshape(unit.shape), fake_quantize(unit, bits))
    assert levels[0] == Level.L0 and levels[-1] == Level.L0  # sinks and window pinned
    assert Level.L2 in levels
    # bytes: L0 tokens at bf16 plus each quantized unit's honest size
    unit = original[:, :, 2:4].reshape(2, 2, 32, 3, 64)
    q_bytes = quantize_block(unit, 4).num_bytes
    num_q = sum(lv != Level.L0 for lv in levels)
    assert cache.num_bytes(n) == (n - 32 * num_q) * cache.token_bytes + num_q * q_bytes
    # no pressure: everything back to L0, bit-identical
    cache.restage(n, pressure=0.0)
    assert torch.equal(cache.kv, original) and cache.num_bytes(n) == n * cache.token_bytes


def test_auto_chunk_divides_units_and_windows() -> None:
    assert auto_chunk([BASELINE]) == 128
    p = dataclasses.replace(SAFE, quant_group_tokens=128, recent_window_tokens=48)
    assert auto_chunk([p]) == 16
    assert auto_chunk([ALL_INT4]) == 32


@pytest.fixture(scope="module")
def model(model_folder: Path):
    return load_model(model_folder, torch.bfloat16, max_positions=128)


@pytest.fixture(scope="module")
def token_ids(tokenizer) -> list[int]:
    return tokenizer(TEXT.read_text())["input_ids"][:256]


def test_streaming_baseline_matches_one_shot_forward(model, token_ids) -> None:
    """The chunked path (each chunk attending to the cached prefix) scores like one
    forward over the window: streaming does not change the baseline."""
    from serving.models.attention import AttentionMetadata

    settings = EvalSettings(context=128, chunk=16)
    res = evaluate(model, token_ids, [BASELINE], settings)["baseline"]
    nll, count = 0.0, 0
    for s in range(0, 256, 128):
        ids = torch.tensor(token_ids[s : s + 128])
        kv = torch.zeros(30, 2, 8, 16, 3, 64, dtype=torch.bfloat16)
        meta = AttentionMetadata(
            torch.arange(128), torch.arange(8)[None], torch.tensor([128]), [128], [128], False
        )
        logp = torch.log_softmax(model.compute_logits(model(ids, torch.arange(128), kv, meta)), -1)
        nll -= float(logp[:-1].gather(1, ids[1:, None]).sum())
        count += 127
    assert res["num_tokens"] == count and res["kld"] == 0.0
    assert res["ppl"] == pytest.approx(float(torch.tensor(nll / count).exp()), rel=5e-3)


def test_quantized_profiles_trade_bytes_for_quality(model, token_ids) -> None:
    settings = EvalSettings(context=128)
    res = evaluate(model, token_ids, [BASELINE, SAFE, ALL_INT4], settings)
    base, int4 = res["baseline"], res["all-int4"]
    assert base["kv_bytes_per_token"] == base["fp16_bytes_per_token"] == 23040
    assert int4["kld"] > 0 and int4["ppl"] != base["ppl"]
    assert int4["reduction_vs_fp16"] > 3.0 and int4["level_fractions"]["L2"] == 1.0
    # shorter lengths hold a partly filled unit at L0, so the decode mean costs more
    assert int4["kv_bytes_per_token_decode_mean"] > int4["kv_bytes_per_token"]
    assert base["kv_bytes_per_token_decode_mean"] == 23040
    assert res["safe"]["kld"] < int4["kld"]
    for r in res.values():
        assert r["context"] == 128 and r["num_tokens"] == 254


def test_cli_json(tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.json"
    argv = ["eval", "ppl", "--text", str(TEXT), "--profile", "safe", "--context", "64"]
    argv += ["--max-tokens", "130", "--json", "--out", str(out)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    for key in ("ppl", "kld", "kv_bytes_per_token", "profile", "context", "num_tokens"):
        assert key in printed
    assert printed["profile"] == "safe" and printed["context"] == 64
    assert printed["num_tokens"] == 63 + 63 + 1
    assert main(["eval", "ppl", "--text", str(TEXT), "--profile", "nope"]) == 2
    assert main(["eval", "ppl", "--text", str(TEXT), "--context", "1", "--max-tokens", "8"]) == 2
    assert main(["eval", "ppl", "--text", str(tmp_path / "missing.txt")]) == 2


def test_attention_mass_probe_counts_every_query_once(model, token_ids) -> None:
    """Each query's softmax sums to 1 per head and layer, so the units' masses add up to
    layers x heads x tokens; the first unit (attention sinks) draws the most."""
    from serving.eval.importance import AttentionMassProbe
    from serving.eval.ppl import _forward_window

    cache = StagedCache(30, 3, 64, 128, torch.bfloat16, ALL_INT4)
    probe = AttentionMassProbe(model, cache)
    try:
        _forward_window(model, torch.tensor(token_ids[:128]), cache, EvalSettings(128, 32), probe)
    finally:
        probe.close()
    assert len(cache.unit_mass) == 4
    assert sum(cache.unit_mass) == pytest.approx(30 * 9 * 128, rel=1e-3)
    assert cache.unit_mass[0] == max(cache.unit_mass)
    res = evaluate(model, token_ids[:128], [ALL_INT4], EvalSettings(128, importance="attention"))
    assert res["all-int4"]["importance"] == "attention" and res["all-int4"]["kld"] > 0
