"""BlockPool and BatchScheduler bookkeeping with model-free sequences.

`_advance` plays the engine's part after each step (count computed tokens, append the
sampled token), so the scheduler sees the same state changes as in `LLMEngine.commit`.
"""

from __future__ import annotations

import pytest

from serving.engine.block_pool import BlockPool, NoFreeBlocks
from serving.engine.sampling_params import SamplingParams
from serving.engine.scheduler import BatchScheduler, SchedulerOutput, blocks_for
from serving.engine.sequence import SeqStatus, Sequence
from serving.kv.block_format import KVLayout, KVPayload

BS = 4


def _seq(req_id: str, prompt_len: int, **kw) -> Sequence:
    return Sequence(req_id, list(range(100, 100 + prompt_len)), SamplingParams(), **kw)


def _sched(num_blocks: int, max_num_seqs: int = 8, max_tokens: int = 1000, **kw):
    pool = BlockPool(num_blocks)
    return pool, BatchScheduler(pool, BS, max_num_seqs, max_tokens, **kw)


def _advance(out: SchedulerOutput) -> None:
    for seq, n in zip(out.seqs, out.num_scheduled_tokens, strict=True):
        seq.num_computed_tokens += n
        seq.output_token_ids.append(1)


def _ids(seqs) -> list[str]:
    return [s.req_id for s in seqs]


# --------------------------------------------------------------------------- BlockPool


def test_block_pool_accounting() -> None:
    pool = BlockPool(8)
    assert (pool.num_free_blocks, pool.num_used_blocks, pool.usage) == (8, 0, 0.0)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert len(set(a + b)) == 8 and set(a + b) == set(range(8))
    assert (pool.num_free_blocks, pool.num_used_blocks, pool.usage) == (0, 8, 1.0)
    assert pool.can_allocate(0) and not pool.can_allocate(1)
    with pytest.raises(NoFreeBlocks):
        pool.allocate(1)
    pool.free(a)
    assert pool.num_free_blocks == 3 and pool.usage == pytest.approx(5 / 8)
    assert pool.can_allocate(3) and not pool.can_allocate(4)
    with pytest.raises(NoFreeBlocks):
        pool.allocate(4)
    assert pool.num_free_blocks == 3  # a failed allocation takes nothing
    assert sorted(pool.allocate(3)) == sorted(a)
    assert pool.allocate(0) == []


def test_block_pool_rejects_empty() -> None:
    with pytest.raises(ValueError):
        BlockPool(0)


def test_blocks_for_rounds_up() -> None:
    assert [blocks_for(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


# --------------------------------------------------------------------------- admission


def test_admission_respects_max_num_seqs() -> None:
    pool, sched = _sched(100, max_num_seqs=2)
    seqs = [_seq(f"s{i}", 5) for i in range(5)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert _ids(out.seqs) == ["s0", "s1"]
    assert _ids(sched.running) == ["s0", "s1"]
    assert _ids(sched.waiting) == ["s2", "s3", "s4"]
    assert all(s.status is SeqStatus.WAITING for s in seqs[2:])
    assert all(s.status is SeqStatus.RUNNING for s in seqs[:2])
    assert pool.num_used_blocks == 2 * blocks_for(5, BS)
    assert sched.num_unfinished == 5

    sched.finish(seqs[0])
    out = sched.schedule()
    assert "s2" in _ids(sched.running) and len(sched.running) == 2


def test_admission_respects_free_blocks_and_keeps_a_spare_per_running_seq() -> None:
    pool, sched = _sched(10)
    seqs = [_seq(f"s{i}", 12) for i in range(3)]  # 3 blocks each
    for s in seqs:
        sched.add(s)
    sched.schedule()
    # s0: 3 <= 10; s1: 3 + 1 spare <= 7; s2: 3 + 2 spares > 4
    assert _ids(sched.running) == ["s0", "s1"]
    assert [len(s.block_table) for s in seqs] == [3, 3, 0]
    assert pool.num_free_blocks == 4
    assert not set(seqs[0].block_table) & set(seqs[1].block_table)


def test_a_prompt_larger_than_the_pool_is_never_admitted() -> None:
    pool, sched = _sched(2)
    sched.add(_seq("huge", 9))  # 3 blocks
    out = sched.schedule()
    assert out.seqs == [] and _ids(sched.waiting) == ["huge"]
    assert pool.num_free_blocks == 2


def test_lone_sequence_may_use_the_whole_pool() -> None:
    pool, sched = _sched(3)
    sched.add(_seq("a", 12))
    out = sched.schedule()
    assert _ids(out.seqs) == ["a"] and pool.num_free_blocks == 0


# --------------------------------------------------------------------------- prefill / decode


def test_prefill_respects_the_token_budget() -> None:
    _, sched = _sched(100, max_tokens=25)
    seqs = [_seq(f"s{i}", 10) for i in range(3)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert out.is_prefill
    assert _ids(out.seqs) == ["s0", "s1"] and out.num_scheduled_tokens == [10, 10]
    _advance(out)
    out = sched.schedule()
    assert out.is_prefill and _ids(out.seqs) == ["s2"] and out.num_scheduled_tokens == [10]
    _advance(out)
    out = sched.schedule()
    assert not out.is_prefill
    assert _ids(out.seqs) == ["s0", "s1", "s2"] and out.num_scheduled_tokens == [1, 1, 1]


def test_prompt_over_budget_runs_alone() -> None:
    _, sched = _sched(100, max_tokens=8)
    sched.add(_seq("big", 20))
    sched.add(_seq("small", 3))
    out = sched.schedule()
    assert _ids(out.seqs) == ["big"] and out.num_scheduled_tokens == [20]
    _advance(out)
    out = sched.schedule()
    assert _ids(out.seqs) == ["small"] and out.num_scheduled_tokens == [3]


def test_prefill_waits_for_no_decode_and_decodes_wait_for_prefill() -> None:
    _, sched = _sched(100)
    a = _seq("a", 6)
    sched.add(a)
    _advance(sched.schedule())
    b = _seq("b", 7)
    sched.add(b)
    out = sched.schedule()
    assert out.is_prefill and _ids(out.seqs) == ["b"]  # a's decode waits one step
    _advance(out)
    out = sched.schedule()
    assert not out.is_prefill and _ids(out.seqs) == ["a", "b"]


def test_decode_allocates_a_block_exactly_at_block_boundaries() -> None:
    pool, sched = _sched(10)
    seq = _seq("a", BS)  # exactly one full block
    sched.add(seq)
    out = sched.schedule()
    assert out.is_prefill and len(seq.block_table) == 1
    _advance(out)
    sizes = []
    for _ in range(9):
        out = sched.schedule()
        assert not out.is_prefill and out.num_scheduled_tokens == [1]
        # the token computed this step sits at position num_tokens - 1; it needs its block
        assert len(seq.block_table) == blocks_for(seq.num_tokens, BS)
        sizes.append(len(seq.block_table))
        _advance(out)
    assert sizes == [2, 2, 2, 2, 3, 3, 3, 3, 4]
    assert pool.num_used_blocks == 4
    assert len(set(seq.block_table)) == 4


# --------------------------------------------------------------------------- preemption


def _three_decoding(num_blocks: int = 6):
    pool, sched = _sched(num_blocks)
    seqs = [_seq(n, BS) for n in "abc"]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert _ids(out.seqs) == ["a", "b", "c"] and out.is_prefill
    _advance(out)
    return pool, sched, seqs


def test_preemption_picks_the_most_recently_admitted() -> None:
    pool, sched, (a, b, c) = _three_decoding()
    out = sched.schedule()  # 5 tokens each: one more block each, pool now full
    assert _ids(out.seqs) == ["a", "b", "c"] and out.preempted == []
    assert pool.num_free_blocks == 0
    for _ in range(3):  # up to 8 tokens: no new blocks
        _advance(out)
        out = sched.schedule()
        assert out.preempted == [] and len(out.seqs) == 3
    _advance(out)

    c_blocks = list(c.block_table)
    out = sched.schedule()  # 9 tokens: everybody needs a third block, none is free
    assert _ids(out.preempted) == ["c"]
    assert _ids(out.seqs) == ["a", "b"]
    assert (c.status, c.num_computed_tokens, c.block_table, c.num_preemptions) == (
        SeqStatus.WAITING,
        0,
        [],
        1,
    )
    assert c.num_output_tokens == 5  # its output survives, to be recomputed
    assert _ids(sched.waiting) == ["c"]
    assert len(a.block_table) == len(b.block_table) == 3
    assert set(c_blocks) <= set(a.block_table) | set(b.block_table)
    assert pool.num_free_blocks == 0


def test_preempted_sequence_comes_back_first_and_recomputes_everything() -> None:
    pool, sched, (a, b, c) = _three_decoding()
    sched.add(_seq("late", 2))
    for _ in range(5):
        out = sched.schedule()
        _advance(out)
    assert _ids(sched.waiting)[0] == "c"
    sched.finish(a)
    sched.finish(b)
    assert pool.num_free_blocks == 6
    out = sched.schedule()
    assert out.is_prefill and _ids(out.seqs)[0] == "c"
    assert out.num_scheduled_tokens[0] == c.num_tokens == BS + 5
    assert c.status is SeqStatus.RUNNING


def test_a_sequence_can_preempt_itself() -> None:
    pool, sched = _sched(3)
    a, b = _seq("a", BS), _seq("b", BS)
    sched.add(a)
    sched.add(b)
    _advance(sched.schedule())
    out = sched.schedule()  # a takes the last free block; b has none and is the newest
    assert _ids(out.seqs) == ["a"] and _ids(out.preempted) == ["b"]
    assert len(a.block_table) == 2 and b.block_table == []
    assert pool.num_free_blocks == 1


# --------------------------------------------------------------------------- remove / finish


def test_remove_and_finish_free_blocks() -> None:
    pool, sched = _sched(20)
    seqs = [_seq(f"s{i}", 6) for i in range(3)]
    for s in seqs:
        sched.add(s)
    sched.schedule()
    waiting = _seq("w", 3)
    sched.add(waiting)
    used = pool.num_used_blocks
    assert sched.remove("s1") is seqs[1]
    assert pool.num_used_blocks == used - 2 and seqs[1].block_table == []
    assert sched.remove("w") is waiting and list(sched.waiting) == []
    assert sched.remove("nope") is None
    sched.finish(seqs[0])
    assert seqs[0].status is SeqStatus.FINISHED
    assert _ids(sched.running) == ["s2"]
    assert pool.num_used_blocks == 2


def test_kv_import_is_copied_on_admission_and_skips_the_prefill() -> None:
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=2, block_size=BS, dtype="float32")
    payload = KVPayload(layout=layout, num_tokens=10, blocks=["b0", "b1", "b2"])
    admitted = []
    pool, sched = _sched(8, on_admit=lambda s: admitted.append((s.req_id, list(s.block_table))))
    seq = _seq("imp", 10, output_token_ids=[42], kv_import=payload)
    sched.add(seq)
    out = sched.schedule()
    assert admitted == [("imp", seq.block_table)]
    assert len(seq.block_table) == blocks_for(11, BS) == 3
    assert seq.num_computed_tokens == 10 and seq.kv_import is None
    assert not out.is_prefill and _ids(out.seqs) == ["imp"] and out.num_scheduled_tokens == [1]


# --------------------------------------------------------------------------- chunked prefill


def _mixed(num_blocks: int = 100, max_tokens: int = 8, **kw):
    return _sched(num_blocks, max_tokens=max_tokens, chunked_prefill=True, **kw)


def test_chunked_prefill_splits_a_long_prompt_by_the_budget() -> None:
    _, sched = _mixed(max_tokens=8)
    big = _seq("big", 20)
    sched.add(big)
    counts = []
    for _ in range(3):
        out = sched.schedule()
        assert _ids(out.seqs) == ["big"] and out.is_prefill
        counts.append(out.num_scheduled_tokens[0])
        # only the chunk that reaches the prompt's end samples
        assert out.sampling_rows == ([0] if sum(counts) == 20 else [])
        big.num_computed_tokens += counts[-1]
    assert counts == [8, 8, 4]
    assert len(big.block_table) == blocks_for(20, BS)  # all allocated at admission


def test_decode_rows_come_first_and_prompts_take_what_is_left() -> None:
    _, sched = _mixed(max_tokens=8)
    a, b = _seq("a", 3), _seq("b", 3)
    sched.add(a)
    sched.add(b)
    _advance(sched.schedule())  # both prompts fit the budget: one step
    c = _seq("c", 10)
    sched.add(c)
    out = sched.schedule()
    # a and b decode while c's first chunk uses the rest of the budget
    assert _ids(out.seqs) == ["a", "b", "c"] and out.num_scheduled_tokens == [1, 1, 6]
    assert out.is_prefill and out.sampling_rows == [0, 1]
    _advance(out)  # c has computed 6 of 10 (the helper's appended token is not c's)
    c.output_token_ids.clear()
    out = sched.schedule()
    assert _ids(out.seqs) == ["a", "b", "c"] and out.num_scheduled_tokens == [1, 1, 4]
    assert out.sampling_rows == [0, 1, 2]


def test_without_prompts_a_mixed_schedule_is_a_decode_step() -> None:
    _, sched = _mixed()
    sched.add(_seq("a", 3))
    _advance(sched.schedule())
    out = sched.schedule()
    assert not out.is_prefill and out.num_scheduled_tokens == [1]
    assert out.sampling_rows == [0]
