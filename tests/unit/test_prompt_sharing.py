"""n > 1: the choices of one request share the prompt's KV blocks (reference-counted) and
copy the prompt's last, partial block (copy-on-write: each writes its own tokens there).

Bookkeeping with model-free sequences, then the real default model: a choice that shares
the prompt samples exactly the tokens it samples alone, with the prompt computed once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving.engine.block_pool import BlockPool
from serving.engine.engine import EngineConfig, LLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.engine.scheduler import GROUP_WAIT_S, BatchScheduler
from serving.engine.sequence import Sequence
from serving.models.loader import load_model

BS = 4


def _choice(req_id: str, prompt: list[int], group: str | None = "req") -> Sequence:
    seq = Sequence(req_id, list(prompt), SamplingParams())
    seq.prompt_group = group
    return seq


def test_block_pool_frees_a_shared_block_with_its_last_owner() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    assert pool.share(blocks) == blocks and pool.num_owners(blocks[0]) == 2
    pool.free(blocks)
    assert pool.num_free_blocks == 2  # still owned once
    pool.free(blocks)
    assert pool.num_free_blocks == 4


def test_a_choice_waits_for_the_prompt_then_shares_its_full_blocks_and_copies_the_last() -> None:
    copies: list[tuple[int, int]] = []
    pool = BlockPool(16)
    sched = BatchScheduler(pool, BS, 8, 1000, copy_block=lambda s, d: copies.append((s, d)))
    prompt = list(range(10, 20))  # 10 tokens: blocks 0-1 full before the last, block 2 partial
    first, second = _choice("req-0", prompt), _choice("req-1", prompt)
    sched.add(first)
    sched.add(second)
    out = sched.schedule()
    assert out.seqs == [first], "the second choice computed the prompt again"
    assert list(sched.waiting) == [second]
    first.num_computed_tokens += out.num_scheduled_tokens[0]
    first.output_token_ids.append(1)
    out = sched.schedule()
    assert second in out.seqs
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]
    assert [pool.num_owners(b) for b in first.block_table[:3]] == [2, 2, 1]
    assert copies == [(first.block_table[2], second.block_table[2])]
    assert second.num_computed_tokens == len(prompt) - 1  # only the last token: own logits
    assert out.num_scheduled_tokens[out.seqs.index(second)] == 1
    used = pool.num_used_blocks
    sched.finish(first)
    assert pool.num_used_blocks == used - 1  # only its own last block is free
    sched.finish(second)
    assert pool.num_used_blocks == 0


def test_other_prompts_and_ungrouped_requests_share_nothing() -> None:
    pool = BlockPool(32)
    sched = BatchScheduler(pool, BS, 8, 1000)
    a, b = _choice("a", list(range(10))), _choice("b", list(range(1, 11)))  # same group
    c, d = _choice("c", list(range(10)), None), _choice("d", list(range(10)), None)
    for seq in (a, b, c, d):
        sched.add(seq)
    out = sched.schedule()
    assert out.seqs == [a, b, c, d]
    blocks = [x for s in (a, b, c, d) for x in s.block_table]
    assert len(set(blocks)) == len(blocks)


def test_the_choices_of_a_request_are_admitted_together_or_after_a_bounded_wait() -> None:
    sched = BatchScheduler(BlockPool(32), BS, 8, 1000)
    prompt = list(range(10))
    first, second = _choice("g-0", prompt), _choice("g-1", prompt)
    first.group_size = second.group_size = 2
    sched.add(first)
    out = sched.schedule()
    assert not out.seqs and list(sched.waiting) == [first]  # its sibling is on its way
    sched.add(second)
    assert sched.schedule().seqs == [first]  # both here: the first computes the prompt
    late = _choice("h-0", prompt, "h")
    late.group_size = 2
    late.arrival_time -= GROUP_WAIT_S + 0.1  # its sibling never came (its client left)
    sched.add(late)
    assert late in sched.schedule().seqs


@pytest.fixture(scope="module")
def model(model_folder: Path):
    return load_model(model_folder, torch.float32)


def _drain(engine: LLMEngine) -> None:
    for _ in range(500):
        if not engine.has_unfinished():
            return
        engine.step()
    raise AssertionError("engine did not finish")


def test_choices_sharing_the_prompt_sample_what_each_samples_alone(model) -> None:
    cfg = EngineConfig(num_blocks=64, block_size=4, max_num_seqs=8, max_model_len=512)
    prompt = list(range(300, 323))  # 23 tokens: 5 full blocks shared, a partial one copied
    params = [SamplingParams(max_tokens=12, temperature=1.0, seed=7 + i) for i in range(3)]
    engine = LLMEngine(model, cfg, model.arch.eos_token_ids)
    grouped = [Sequence(f"r-{i}", list(prompt), p) for i, p in enumerate(params)]
    for seq in grouped:
        seq.prompt_group = "r"
        engine.add_request(seq)
    prompt_tokens_computed = 0
    schedule = engine.scheduler.schedule

    def counting_schedule():
        nonlocal prompt_tokens_computed
        out = schedule()
        rows = zip(out.seqs, out.num_scheduled_tokens, strict=True) if out else []
        for seq, n in rows:
            start = seq.num_computed_tokens  # before the step
            prompt_tokens_computed += max(0, min(start + n, len(prompt)) - start)
        return out

    engine.scheduler.schedule = counting_schedule
    _drain(engine)
    # the prompt computed once, then each other choice's last prompt token (its own logits)
    assert prompt_tokens_computed == len(prompt) + 2
    assert engine.block_pool.num_used_blocks == 0
    alone = []
    for p in params:
        engine = LLMEngine(model, cfg, model.arch.eos_token_ids)
        seq = Sequence("alone", list(prompt), p)
        engine.add_request(seq)
        _drain(engine)
        alone.append(seq.output_token_ids)
    assert [s.output_token_ids for s in grouped] == alone
    assert len({tuple(t) for t in alone}) == 3, "seeds 7, 8, 9 gave the same answer"
