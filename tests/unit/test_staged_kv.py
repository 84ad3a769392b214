"""Staged KV in the live engine cache, on the real default model (fp32):

- decode attention over quantized units sees exactly the dequantized values (same logits
  as a cache holding those values at full precision), with the units' pool blocks freed;
- demotion L0 → L1 → L2 and promotion back is bit-identical (originals in the spill tier);
- releasing a sequence leaves no units, bytes or spill files behind;
- under a KV budget that can't hold every sequence at full precision, demotion makes room
  before anything is preempted, and the answers stay those of an unconstrained engine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from policies.kv_levels import Level, Profile
from serving.engine.engine import EngineConfig, LLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import Sequence
from serving.engine.staged_kv import HOLE
from serving.kv.quant import dequantize_block, quantize_block
from serving.models.loader import load_model

BS = 16
UNIT_TOKENS = 32
UB = UNIT_TOKENS // BS
TEXT = (
    "The history of the city begins in the Roman period, when a small settlement grew up "
    "beside the river crossing. Over the following centuries the town became a market for "
    "the surrounding farms, and its bridge, rebuilt in stone, carried the main road to the "
    "north. In the middle ages a castle and an abbey were founded, and the population grew "
    "as wool and cloth brought trade from across the country."
)

# Everything outside the sink and the recent window goes to L1 at any pressure.
FORCE_L1 = Profile(
    "force-l1", recent_window_tokens=32, num_sink_tokens=4,
    allowed_levels=frozenset({Level.L0, Level.L1}), l1_importance=float("inf"), l1_pressure=0.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def model(model_folder: Path):
    return load_model(model_folder, torch.float32)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[int]:
    ids = tokenizer(TEXT + " " + TEXT)["input_ids"]
    assert len(ids) > 4 * UNIT_TOKENS
    return ids


def _engine(model, tmp_path: Path, **overrides) -> LLMEngine:
    cfg = dict(
        num_blocks=128, block_size=BS, max_num_seqs=8, max_num_batched_tokens=1024,
        max_model_len=1024, kv_unit_tokens=UNIT_TOKENS, kv_spill_dir=str(tmp_path),
    )  # fmt: skip
    cfg.update(overrides)
    return LLMEngine(model, EngineConfig(**cfg), model.arch.eos_token_ids)


def _prefilled(engine: LLMEngine, prompt_ids: list[int]) -> Sequence:
    params = SamplingParams(max_tokens=64, temperature=0.0)
    engine.add_request(Sequence("s", list(prompt_ids), params))
    engine.step()  # prefill
    return engine.scheduler.running[0]


def test_attention_over_quantized_units_equals_attention_over_their_dequantized_values(
    model, prompt_ids, tmp_path
) -> None:
    eng = _engine(model, tmp_path)
    seq = _prefilled(eng, prompt_ids)
    batch = eng.scheduler.schedule()  # the decode step, with its new slot allocated
    assert batch is not None and not batch.is_prefill
    cache = eng.runner.kv_cache
    original = cache.clone()
    units = [0, 1, 2]

    # reference: the same units fake-quantized in place, read as ordinary L0 blocks
    for u in units:
        blocks = seq.block_table[u * UB : (u + 1) * UB]
        data = cache[:, :, blocks].reshape(cache.shape[0], 2, UNIT_TOKENS, *cache.shape[4:])
        fake = dequantize_block(quantize_block(data, 8)).view(cache.shape[0], 2, UB, BS, 3, 64)
        cache[:, :, blocks] = fake
    reference = eng.runner.execute(batch, importance_layer=7)
    reference_mass = eng.runner.last_importance[0]  # per block

    cache.copy_(original)
    used_before = eng.block_pool.num_used_blocks
    for u in units:
        eng.staged.demote(seq, u, UB, Level.L1)
    assert seq.block_table[: len(units) * UB] == [HOLE] * (len(units) * UB)
    assert eng.block_pool.num_used_blocks == used_before - len(units) * UB
    assert eng.block_pool.extra_bytes == eng.staged.pools[(Level.L1, 8)].num_bytes > 0
    staged = eng.runner.execute(batch, eng.staged.plan(batch.seqs), importance_layer=7)
    torch.testing.assert_close(staged, reference, rtol=0, atol=1e-4)
    assert staged.argmax(-1).tolist() == reference.argmax(-1).tolist()
    # attention mass: a unit's lands on its first block, the rest per block as before
    mass = eng.runner.last_importance[0]
    for u in units:
        got, want = mass[u * UB : (u + 1) * UB].sum(), reference_mass[u * UB : (u + 1) * UB].sum()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    n = len(seq.block_table)
    torch.testing.assert_close(mass[len(units) * UB : n], reference_mass[len(units) * UB : n])
    torch.testing.assert_close(mass[:n].sum(), torch.tensor(9.0), atol=1e-3, rtol=0)  # 9 heads


def test_demote_l1_then_l2_then_promote_is_bit_identical(model, prompt_ids, tmp_path) -> None:
    eng = _engine(model, tmp_path)
    seq = _prefilled(eng, prompt_ids)
    cache = eng.runner.kv_cache
    blocks = seq.block_table[UB : 2 * UB]
    before = cache[:, :, blocks].clone()
    eng.staged.demote(seq, 1, UB, Level.L1)
    eng.staged.demote(seq, 1, UB, Level.L2)  # requantized from the original, not from L1
    assert eng.staged.state(seq).units[1].level == Level.L2
    assert eng.staged.promote(seq, 1, UB)
    after = cache[:, :, seq.block_table[UB : 2 * UB]]
    assert torch.equal(after.view(torch.int32), before.view(torch.int32))  # every bit
    assert eng.staged.counters.promotions == 1 and eng.staged.counters.demotions == 2


def test_release_leaves_no_units_bytes_or_spill_files(model, prompt_ids, tmp_path) -> None:
    eng = _engine(model, tmp_path)
    seq = _prefilled(eng, prompt_ids)
    free_before_demotion = eng.block_pool.num_free_blocks
    eng.staged.demote(seq, 0, UB, Level.L2)
    eng.staged.demote(seq, 1, UB, Level.L1)
    assert eng.staged.spill.num_bytes > 0
    assert eng.block_pool.num_free_blocks > free_before_demotion - 1
    eng.abort("s")
    assert eng.block_pool.num_used_blocks == 0
    assert eng.block_pool.extra_bytes == 0
    assert all(pool.num_units == 0 for pool in eng.staged.pools.values())
    assert eng.staged.spill.num_bytes == 0
    assert eng.staged.states == {}


def _run_all(eng: LLMEngine, prompts: list[list[int]], max_tokens: int) -> dict[str, list[int]]:
    """Greedy answers by request id; `eng.max_running` is the most sequences decoded at once."""
    for i, ids in enumerate(prompts):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        eng.add_request(Sequence(f"r{i}", list(ids), params))
    out: dict[str, list[int]] = {}
    eng.max_running = 0
    for _ in range(2000):
        if not eng.has_unfinished():
            break
        eng.max_running = max(eng.max_running, eng.num_running)
        for o in eng.step():
            out.setdefault(o.req_id, []).extend(o.new_token_ids)
    assert not eng.has_unfinished()
    return out


def test_pressure_demotes_instead_of_preempting_and_answers_match(
    model, prompt_ids, tmp_path
) -> None:
    # 4 sequences of 158 + 24 tokens need 4 * 12 = 48 blocks at L0; the pool has 40.
    prompts = [prompt_ids[i:] + prompt_ids[:i] for i in range(4)]
    unconstrained = _run_all(_engine(model, tmp_path / "a"), prompts, 24)

    tight_baseline = _engine(model, tmp_path / "b", num_blocks=40)
    _run_all(tight_baseline, prompts, 24)
    assert tight_baseline.max_running < 4  # the budget really is too small at L0

    staged = _engine(model, tmp_path / "c", num_blocks=40)
    staged.staged.profile = FORCE_L1
    answers = _run_all(staged, prompts, 24)
    assert staged.staged.counters.demotions > 0
    assert staged.num_preemptions == 0
    assert staged.max_running == 4
    for rid, tokens in unconstrained.items():
        assert answers[rid][:16] == tokens[:16], rid


def test_kv_exported_with_quantized_units_continues_identically_elsewhere(
    model, prompt_ids, tmp_path
) -> None:
    """Engine A demotes, exports (units stay quantized), engine B imports: B's next-token
    logits equal A's, and promoting an imported unit yields its dequantized values."""
    a = _engine(model, tmp_path / "a")
    seq_a = _prefilled(a, prompt_ids)
    a.staged.demote(seq_a, 0, UB, Level.L1)
    a.staged.demote(seq_a, 1, UB, Level.L2)
    payload = a.staged.export(seq_a, seq_a.num_tokens - 1, a.runner.layout, a.runner.export_blocks)
    assert payload.spans[:2] == [UB, UB] and payload.num_blocks == -(-payload.num_tokens // BS)
    batch_a = a.scheduler.schedule()
    logits_a = a.runner.execute(batch_a, a.staged.plan(batch_a.seqs))

    b = _engine(model, tmp_path / "b")
    seq_b = Sequence("s", list(prompt_ids), SamplingParams(max_tokens=8, temperature=0.0))
    seq_b.output_token_ids = list(seq_a.output_token_ids)
    seq_b.kv_import = payload
    b.add_request(seq_b)
    batch_b = b.scheduler.schedule()
    assert not batch_b.is_prefill  # everything but the newest token came from A
    assert b.staged.state(seq_b).units.keys() == {0, 1}
    logits_b = b.runner.execute(batch_b, b.staged.plan(batch_b.seqs))
    torch.testing.assert_close(logits_b, logits_a, rtol=0, atol=1e-4)

    unit = b.staged.state(seq_b).units[1]
    expected = dequantize_block(b.staged.pools[unit.pool].get(unit.slot))
    assert b.staged.promote(seq_b, 1, UB)
    blocks = seq_b.block_table[UB : 2 * UB]
    got = b.runner.kv_cache[:, :, blocks].reshape(expected.shape[0], 2, UNIT_TOKENS, 3, 64)
    assert torch.equal(got, expected)
