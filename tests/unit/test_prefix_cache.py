"""Automatic prefix caching (`serving.engine.prefix_cache`): a finished sequence's full KV
blocks stay in the pool, a later prompt that starts the same way shares them, and they
give their room back when a new sequence needs it.

Bookkeeping with model-free sequences, then the real default model in fp32: the next turn
of a conversation, computed over the cached blocks, samples exactly what it samples from
scratch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving.engine.block_pool import BlockPool
from serving.engine.engine import EngineConfig, LLMEngine
from serving.engine.prefix_cache import PrefixCache
from serving.engine.sampling_params import SamplingParams
from serving.engine.scheduler import BatchScheduler
from serving.engine.sequence import Sequence
from serving.models.loader import load_model

BS = 4


def _scheduler(num_blocks: int) -> tuple[BatchScheduler, BlockPool, PrefixCache]:
    pool = BlockPool(num_blocks)
    cache = PrefixCache(pool, BS)
    return BatchScheduler(pool, BS, 8, 1000, prefix_cache=cache), pool, cache


def _run_prompt(sched: BatchScheduler, seq: Sequence, answer: list[int]) -> None:
    """Admit `seq`, compute what it has left of its prompt, give it `answer`, finish it."""
    sched.add(seq)
    out = sched.schedule()
    assert out is not None and seq in out.seqs
    seq.num_computed_tokens += out.num_scheduled_tokens[out.seqs.index(seq)]
    for token in answer:  # one token a decode step: the previous one's KV gets written
        seq.output_token_ids.append(token)
        seq.num_computed_tokens = seq.num_tokens - 1
    sched.finish(seq)


def test_pool_counts_a_block_only_the_cache_owns_as_free_and_evicts_oldest_first() -> None:
    pool = BlockPool(4)
    evicted: list[int] = []
    pool.on_evict = evicted.append
    a, b = pool.allocate(2)
    pool.retain(a)
    pool.retain(b)
    assert pool.num_used_blocks == 2 and pool.num_cached_blocks == 2
    pool.free([b])  # released first: evicted first
    pool.free([a])
    assert pool.num_used_blocks == 0 and pool.num_free_blocks == 4 and pool.usage == 0
    pool.share([a])  # a sequence uses a again: not room any more
    assert pool.num_free_blocks == 3
    taken = pool.allocate(3)
    assert evicted == [b] and b in taken and a not in taken
    assert pool.num_cached_blocks == 1
    pool.free([a])
    assert pool.num_free_blocks == 1
    with pytest.raises(Exception, match="KV blocks"):
        pool.allocate(2)


def test_next_turn_shares_the_finished_turns_full_blocks_and_computes_the_rest() -> None:
    sched, pool, cache = _scheduler(16)
    turn1 = Sequence("t1", list(range(100, 110)), SamplingParams())  # 10 prompt tokens
    _run_prompt(sched, turn1, [7, 8, 9])  # 13 tokens, 12 computed: 3 full blocks
    assert cache.num_blocks == 3 and pool.num_used_blocks == 0
    turn2 = Sequence("t2", [*range(100, 110), 7, 8, 9, 50, 51, 52, 53], SamplingParams())
    sched.add(turn2)
    out = sched.schedule()
    assert out.seqs == [turn2]
    assert turn2.num_computed_tokens == 12  # 3 cached blocks
    assert out.num_scheduled_tokens == [5]  # only the rest
    assert [pool.num_owners(b) for b in turn2.block_table[:3]] == [2, 2, 2]
    assert cache.num_hit_tokens == 12 and cache.num_queried_tokens == 10 + 17


def test_a_prompt_that_is_all_cached_still_computes_its_last_token() -> None:
    sched, _, _ = _scheduler(16)
    _run_prompt(sched, Sequence("a", list(range(8)), SamplingParams()), [1, 2])  # 9 computed
    again = Sequence("b", list(range(8)), SamplingParams())  # 2 full blocks, both cached
    sched.add(again)
    out = sched.schedule()
    # the first block only: the second holds the prompt's last token, whose logits it needs
    assert again.num_computed_tokens == 4 and out.num_scheduled_tokens == [4]


def test_prompt_logprobs_and_other_prompts_get_no_cached_prefix() -> None:
    sched, _, _ = _scheduler(16)
    _run_prompt(sched, Sequence("a", list(range(12)), SamplingParams()), [1])
    logprobs = Sequence("lp", list(range(12)), SamplingParams(prompt_logprobs=1))
    other = Sequence("o", [5, *range(1, 12)], SamplingParams())
    for seq in (logprobs, other):
        sched.add(seq)
    sched.schedule()
    assert logprobs.num_computed_tokens == 0 and other.num_computed_tokens == 0


def test_cached_blocks_give_their_room_to_new_sequences_but_not_to_their_own_user() -> None:
    sched, pool, cache = _scheduler(6)
    _run_prompt(sched, Sequence("a", list(range(16)), SamplingParams()), [1])  # 4 cached
    assert cache.num_blocks == 4 and pool.num_free_blocks == 6
    # a different 20-token prompt needs 5 blocks: 2 never used + 3 cached ones evicted
    big = Sequence("big", list(range(500, 520)), SamplingParams())
    sched.add(big)
    sched.schedule()
    assert len(big.block_table) == 5 and cache.num_blocks == 1
    sched.finish(big)
    # a prompt that matches cached blocks takes them before room is made for its rest:
    # the room comes from other cached blocks, even where its own are the oldest
    sched2, pool2, cache2 = _scheduler(5)
    _run_prompt(sched2, Sequence("a", list(range(16)), SamplingParams()), [1])  # 4 cached
    _run_prompt(sched2, Sequence("c", [900, 901, 902, 903], SamplingParams()), [1])  # 1
    assert cache2.num_blocks == 5 and pool2.num_free_blocks == 5
    reuse = Sequence("r", [*range(16), 1, 60, 61, 62], SamplingParams())  # 20 tokens
    sched2.add(reuse)
    sched2.schedule()
    assert reuse.num_computed_tokens == 16
    assert len(set(reuse.block_table)) == 5 and pool2.num_free_blocks == 0
    assert cache2.num_blocks == 4  # c's block made the room


def test_blocks_after_one_demoted_by_staged_kv_are_not_cached() -> None:
    pool = BlockPool(8)
    cache = PrefixCache(pool, BS)
    table = pool.allocate(3)
    held_elsewhere = [table[0], -1, table[2]]  # block 1 quantized outside the pool
    cache.insert(list(range(12)), held_elsewhere)
    pool.free(held_elsewhere)
    assert cache.num_blocks == 1 and cache.match(list(range(12))) == [table[0]]


def test_off_when_not_asked_for() -> None:
    pool = BlockPool(16)
    sched = BatchScheduler(pool, BS, 8, 1000)
    _run_prompt(sched, Sequence("a", list(range(12)), SamplingParams()), [1])
    again = Sequence("b", list(range(12)), SamplingParams())
    sched.add(again)
    sched.schedule()
    assert again.num_computed_tokens == 0 and pool.num_cached_blocks == 0


# --- the real model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(model_folder: Path):
    return load_model(model_folder, torch.float32)


def _generate(engine: LLMEngine, req_id: str, prompt: list[int], n: int) -> list[int]:
    seq = Sequence(req_id, list(prompt), SamplingParams(max_tokens=n, temperature=0.0))
    engine.add_request(seq)
    for _ in range(500):
        if not engine.has_unfinished():
            return seq.output_token_ids
        engine.step()
    raise AssertionError("engine did not finish")


def test_next_turn_over_cached_blocks_samples_what_it_samples_from_scratch(model) -> None:
    prompt = list(range(300, 345))  # 45 tokens
    new_message = list(range(1200, 1213))

    def two_turns(prefix_caching: bool) -> tuple[list[int], int]:
        cfg = EngineConfig(
            num_blocks=64, block_size=8, max_model_len=512, prefix_caching=prefix_caching
        )
        engine = LLMEngine(model, cfg, model.arch.eos_token_ids)
        answer = _generate(engine, "turn-1", prompt, 12)
        computed = 0
        schedule = engine.scheduler.schedule

        def counting_schedule():
            nonlocal computed
            out = schedule()
            computed += sum(out.num_scheduled_tokens) if out else 0
            return out

        engine.scheduler.schedule = counting_schedule
        second = _generate(engine, "turn-2", [*prompt, *answer, *new_message], 12)
        return second, computed

    cached, computed_cached = two_turns(True)
    scratch, computed_scratch = two_turns(False)
    assert cached == scratch
    # turn 2 is 45 + 12 + 13 = 70 tokens; turn 1 computed 45 + 11 of them: 7 full blocks
    assert computed_scratch - computed_cached == 7 * 8
