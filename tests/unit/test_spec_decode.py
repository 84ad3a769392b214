"""Speculative decoding inside the real engine on the real default model (fp32): greedy
output identical to plain decoding for every proposer, KV rollback leaves no stale slots
or blocks, and the draft model's own KV rolls back with the common prefix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving.engine.engine import EngineConfig, LLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.engine.scheduler import blocks_for
from serving.engine.sequence import Sequence
from serving.models.loader import load_model
from serving.spec.decode_step import SpecDecodeStep
from serving.spec.draft_model import DraftModelProposer
from serving.spec.factory import truncated_view
from serving.spec.proposer import NgramProposer, TruncatedDraft

CHATS = [
    "Write a short story about a robot who learns to paint.",
    "What is the capital of France?",
    "Repeat after me three times: the quick brown fox jumps over the lazy dog.",
    "List the days of the week.",
]
MAX_TOKENS = [40, 24, 48, 32]  # different lengths: requests leave the batch at different steps


class AlwaysSpeculate:
    """Gate that never switches speculation off, so every decode step takes the spec path
    (the real gate is tested on its own in test_speculation_policy.py)."""

    def should_speculate(self, num_seqs: int) -> bool:
        return True

    def observe(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def model(model_folder: Path):
    return load_model(model_folder, torch.float32, max_positions=520)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": c}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
            )["input_ids"]
        )
        for c in CHATS
    ]


def _engine(model) -> LLMEngine:
    cfg = EngineConfig(
        num_blocks=128, block_size=4, max_num_seqs=8, max_num_batched_tokens=1024, max_model_len=512
    )
    return LLMEngine(model, cfg, model.arch.eos_token_ids)


def _proposer(kind: str, engine: LLMEngine, model_folder: Path):
    if kind == "truncated":
        return TruncatedDraft(engine.runner, num_layers=20, vocab_size=4096)
    if kind == "ngram":
        return NgramProposer()
    # a separate draft with its own KV: the target's first 24 layers loaded again
    draft = truncated_view(load_model(model_folder, torch.float32, max_positions=520), 24)
    return DraftModelProposer(draft, num_blocks=96, block_size=4, vocab_size=8192)


def _run(engine: LLMEngine, prompts, temperature: float = 0.0, check=None) -> dict[str, list]:
    for i, (ids, n) in enumerate(zip(prompts, MAX_TOKENS, strict=True)):
        params = SamplingParams(max_tokens=n, temperature=temperature, seed=i)
        engine.add_request(Sequence(f"r{i}", ids, params))
    outputs: dict[str, list[int]] = {}
    for _ in range(400):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            outputs.setdefault(out.req_id, []).extend(out.new_token_ids)
        if check is not None:
            check(engine)
    assert not engine.has_unfinished()
    return outputs


@pytest.fixture(scope="module")
def plain_greedy(model, prompts) -> dict[str, list[int]]:
    return _run(_engine(model), prompts)


@pytest.mark.parametrize("kind", ["truncated", "ngram", "model"])
def test_greedy_output_identical_with_speculation(
    kind, model, prompts, plain_greedy, model_folder
) -> None:
    engine = _engine(model)
    proposer = _proposer(kind, engine, model_folder)
    engine.attach_spec(SpecDecodeStep(engine, proposer, k_max=4, gate=AlwaysSpeculate()))
    speculative = _run(engine, prompts)
    assert speculative == plain_greedy
    stats = engine.spec.stats
    # the comparison is only worth something if drafts were verified and some survived
    assert stats.num_spec_steps > 0 and stats.num_draft_tokens > 0
    assert stats.num_accepted_tokens > 0
    assert stats.num_accepted_tokens <= stats.num_draft_tokens
    assert engine.block_pool.num_free_blocks == engine.block_pool.num_blocks
    if kind == "model":
        draft = engine.spec.proposer
        assert not draft.states and draft.pool.num_free_blocks == draft.pool.num_blocks


def _kv(engine: LLMEngine, seq: Sequence, num_tokens: int) -> torch.Tensor:
    payload = engine.runner.export_blocks(seq.block_table, num_tokens)
    flat = torch.stack(payload.blocks, dim=2)  # [L, 2, nb, bs, H, D]
    shape = flat.shape
    return flat.reshape(shape[0], shape[1], -1, *shape[4:])[:, :, :num_tokens]


def test_rollback_leaves_no_stale_slots_or_blocks(model, prompts) -> None:
    """Sampling at temperature 1 with a weak draft: most drafts are rejected. After every
    step, each running sequence holds exactly the blocks its tokens need, all but its
    newest token are computed, and the cached K/V of those tokens equal a fresh prefill of
    the same tokens: no rejected draft's K/V is left inside the context."""
    engine = _engine(model)
    proposer = TruncatedDraft(engine.runner, 10, 4096)
    engine.attach_spec(SpecDecodeStep(engine, proposer, k_max=4, gate=AlwaysSpeculate()))
    fresh = _engine(model)
    checked = {"steps": 0, "kv": 0}

    def check(e: LLMEngine) -> None:
        for seq in e.scheduler.running:
            if seq.num_uncomputed_tokens != 1:
                continue  # waiting for its prefill
            # no block beyond the slot of the newest token (the scheduler adds that one
            # before the next step if it is missing), none missing for computed tokens
            bs = e.config.block_size
            assert blocks_for(seq.num_computed_tokens, bs) <= len(seq.block_table)
            assert len(seq.block_table) <= blocks_for(seq.num_tokens, bs)
            checked["steps"] += 1
        if checked["steps"] and checked["kv"] < 3 and e.spec.stats.num_spec_steps % 5 == 1:
            seq = e.scheduler.running[0] if e.scheduler.running else None
            if seq is None or seq.num_uncomputed_tokens != 1:
                return
            n = seq.num_computed_tokens
            ref = Sequence("ref", (seq.prompt_token_ids + seq.output_token_ids)[:n], seq.params)
            fresh.add_request(ref)
            batch = fresh.scheduler.schedule()  # admits it: a prefill of all n tokens
            assert batch is not None and batch.num_scheduled_tokens == [n]
            fresh.runner.execute(batch)
            torch.testing.assert_close(_kv(e, seq, n), _kv(fresh, ref, n), rtol=1e-4, atol=1e-4)
            fresh.abort("ref")
            checked["kv"] += 1

    _run(engine, prompts, temperature=1.0, check=check)
    stats = engine.spec.stats
    assert stats.num_draft_tokens > stats.num_accepted_tokens  # rejections happened
    assert checked["steps"] > 20 and checked["kv"] >= 1
    assert engine.block_pool.num_free_blocks == engine.block_pool.num_blocks


def test_draft_model_rolls_back_to_the_common_prefix(model_folder) -> None:
    draft = truncated_view(load_model(model_folder, torch.float32, max_positions=64), 2)
    proposer = DraftModelProposer(draft, num_blocks=8, block_size=4)
    context = [1, 504, 3458, 282, 4649, 314]
    (first,) = proposer.propose_tokens(["a"], [context], [3])
    assert len(first) == 3
    # cached: the context and the first two drafts (the third was never fed back)
    assert proposer.states["a"].tokens == context + first[:2]
    # the target rejected everything and emitted another token: the cache rolls back
    other = (first[0] + 1) % 4096
    (second,) = proposer.propose_tokens(["a"], [context + [other]], [2])
    assert proposer.states["a"].tokens == context + [other] + second[:1]
    used = len(proposer.states["a"].block_table)
    assert used == blocks_for(len(context) + 1 + 2 - 1, 4)
    # a sequence the caller no longer sends is dropped when room is needed; release frees
    proposer.release("a")
    assert proposer.pool.num_free_blocks == 8 and not proposer.states


def test_a_turn_finished_by_a_speculative_step_hands_its_kv_on(model, prompts) -> None:
    """A sequence that asks for its KV at the end gets it, whichever kind of step ends it:
    the speculative step releases through the engine's own path."""
    engine = _engine(model)
    engine.attach_spec(SpecDecodeStep(engine, NgramProposer(), k_max=4, gate=AlwaysSpeculate()))
    seqs = []
    for i, ids in enumerate(prompts):
        for n in (20, 23, 26, 29):
            seq = Sequence(f"t{i}-{n}", list(ids), SamplingParams(max_tokens=n, temperature=0))
            seq.export_kv_at_finish = True
            engine.add_request(seq)
            seqs.append(seq)
    finished = {}
    ended_by_spec = 0
    while engine.has_unfinished():
        spec_steps = engine.spec.stats.num_spec_steps
        outputs = engine.step()
        speculative = engine.spec.stats.num_spec_steps > spec_steps
        for out in outputs:
            if out.finished:
                finished[out.req_id] = out
                ended_by_spec += speculative
    assert ended_by_spec > 0, "no sequence ended on a speculative step"
    for seq in seqs:
        out = finished[seq.req_id]
        assert out.kv_export is not None, seq.req_id
        assert out.kv_export.num_tokens == seq.num_computed_tokens == seq.num_tokens - 1
