"""LLMEngine on the real default model (fp32): greedy parity with transformers, continuous
batching, block accounting, preemption, abort, stop conditions and KV export/import."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from serving.engine.engine import EngineConfig, LLMEngine, StepOutput
from serving.engine.model_runner import ModelRunner
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import FinishReason, SeqStatus, Sequence
from serving.kv.block_format import KVPayload
from serving.models.loader import load_model

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a",
    "def fibonacci(n):",
    "The three primary colors are",
]
MAX_TOKENS = [7, 9, 6, 8]  # different lengths so requests leave the batch at different steps
STORY = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model(model_folder: Path):
    return load_model(model_folder, torch.float32)


@pytest.fixture(scope="module")
def eos(model) -> tuple[int, ...]:
    assert model.arch.eos_token_ids == (2,)
    return model.arch.eos_token_ids


def _chat_ids(tokenizer, messages) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )


def _engine(model, eos, **overrides) -> LLMEngine:
    cfg = dict(
        num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=512, max_model_len=512
    )
    cfg.update(overrides)
    return LLMEngine(model, EngineConfig(**cfg), eos)


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def _drain(engine: LLMEngine, max_steps: int = 500) -> list[StepOutput]:
    outputs: list[StepOutput] = []
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outputs
        outputs.extend(engine.step())
    raise AssertionError(f"engine did not finish within {max_steps} steps")


def _run_alone(model, eos, prompt_ids: list[int], params: SamplingParams, **cfg) -> Sequence:
    engine = _engine(model, eos, **cfg)
    seq = Sequence("alone", list(prompt_ids), params)
    engine.add_request(seq)
    _drain(engine)
    assert engine.block_pool.num_free_blocks == engine.config.num_blocks
    return seq


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def alone(model, eos, prompt_ids) -> list[list[int]]:
    """Each prompt's greedy output when it has the engine to itself (EOS ignored)."""
    outs = []
    for ids, n in zip(prompt_ids, MAX_TOKENS, strict=True):
        seq = _run_alone(model, eos, ids, _greedy(n, ignore_eos=True))
        assert seq.finish_reason is FinishReason.LENGTH
        assert len(seq.output_token_ids) == n
        outs.append(seq.output_token_ids)
    assert len({tuple(o) for o in outs}) == len(outs)
    return outs


@pytest.fixture(scope="module")
def story(model, eos, tokenizer) -> tuple[list[int], list[int]]:
    """The story chat prompt and our engine's 32 greedy tokens for it."""
    ids = _chat_ids(tokenizer, STORY)
    seq = _run_alone(model, eos, ids, _greedy(32), block_size=16)
    return ids, seq.output_token_ids


def test_greedy_chat_matches_hf_generate(model_folder, story) -> None:
    from transformers import LlamaForCausalLM

    ids, ours = story
    hf = LlamaForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=32,
        )
    expected = out[0, len(ids) :].tolist()
    assert len(expected) == 32  # the model does not stop early on this prompt
    assert ours == expected


def test_continuous_batching_joins_running_requests(model, eos, prompt_ids, alone) -> None:
    engine = _engine(model, eos)
    seqs = [
        Sequence(f"r{i}", list(ids), _greedy(n, ignore_eos=True))
        for i, (ids, n) in enumerate(zip(prompt_ids, MAX_TOKENS, strict=True))
    ]
    engine.add_request(seqs[0])
    for _ in range(3):  # prefill + two decode steps alone
        engine.step()
        assert engine.last_step.num_seqs == 1
    assert len(seqs[0].output_token_ids) == 3

    for seq in seqs[1:]:
        engine.add_request(seq)
    engine.step()  # a mixed step: the running request's token and the newcomers' prompts
    assert engine.last_step.is_prefill
    assert engine.last_step.num_seqs == 4
    assert engine.last_step.num_tokens == 1 + sum(len(ids) for ids in prompt_ids[1:])
    assert len(seqs[0].output_token_ids) == 4  # the running stream did not wait

    decode_sizes = []
    while engine.has_unfinished():
        engine.step()
        assert not engine.last_step.is_prefill
        decode_sizes.append(engine.last_step.num_seqs)
    assert decode_sizes[0] == 4
    assert max(decode_sizes) == 4 and min(decode_sizes) >= 1
    assert sum(1 for n in decode_sizes if n > 1) >= 3
    # requests leave as they finish: the batch only ever shrinks after everyone joined
    assert decode_sizes == sorted(decode_sizes, reverse=True)

    assert [s.output_token_ids for s in seqs] == alone
    assert all(s.status is SeqStatus.FINISHED for s in seqs)
    assert all(s.block_table == [] for s in seqs)
    assert engine.block_pool.num_free_blocks == engine.config.num_blocks
    assert engine.num_preemptions == 0


def test_preemption_completes_every_request_identically(model, eos, prompt_ids, alone) -> None:
    # block_size 4: the longest request needs ceil((8 + 9) / 4) = 5 blocks, all four ~18.
    engine = _engine(model, eos, num_blocks=6)
    seqs = [
        Sequence(f"r{i}", list(ids), _greedy(n, ignore_eos=True))
        for i, (ids, n) in enumerate(zip(prompt_ids, MAX_TOKENS, strict=True))
    ]
    for seq in seqs:
        engine.add_request(seq)
    outputs = _drain(engine)

    assert engine.num_preemptions > 0
    assert sum(s.num_preemptions for s in seqs) == engine.num_preemptions
    assert [s.output_token_ids for s in seqs] == alone
    assert engine.block_pool.num_free_blocks == engine.config.num_blocks
    # each request reported exactly its tokens, in order, despite recomputation
    for seq in seqs:
        streamed = [t for o in outputs if o.req_id == seq.req_id for t in o.new_token_ids]
        assert streamed == seq.output_token_ids
        assert [o.finished for o in outputs if o.req_id == seq.req_id][-1] is True


def test_abort_frees_blocks(model, eos, prompt_ids) -> None:
    engine = _engine(model, eos, num_blocks=32)
    a = Sequence("a", list(prompt_ids[1]), _greedy(20, ignore_eos=True))
    b = Sequence("b", list(prompt_ids[2]), _greedy(3, ignore_eos=True))
    engine.add_request(a)
    engine.add_request(b)
    engine.step()
    engine.step()
    assert engine.block_pool.num_used_blocks == len(a.block_table) + len(b.block_table) > 0

    assert engine.abort("a") is True
    assert engine.block_pool.num_used_blocks == len(b.block_table)
    assert engine.num_running == 1

    waiting = Sequence("w", list(prompt_ids[0]), _greedy(3))
    engine.add_request(waiting)
    assert engine.abort("w") is True
    assert engine.abort("w") is False
    assert engine.abort("never-added") is False

    outputs = _drain(engine)
    assert {o.req_id for o in outputs} == {"b"}
    assert len(b.output_token_ids) == 3
    assert len(a.output_token_ids) == 2  # nothing after the abort
    assert engine.block_pool.num_free_blocks == engine.config.num_blocks
    assert not engine.has_unfinished()


def test_max_tokens_and_max_model_len(model, eos, prompt_ids, alone) -> None:
    engine = _engine(model, eos, max_model_len=len(prompt_ids[3]) + 4)
    by_tokens = Sequence("t", list(prompt_ids[0]), _greedy(3, ignore_eos=True))
    by_len = Sequence("l", list(prompt_ids[3]), _greedy(50, ignore_eos=True))
    engine.add_request(by_tokens)
    engine.add_request(by_len)
    outputs = _drain(engine)

    assert by_tokens.output_token_ids == alone[0][:3]
    assert by_tokens.finish_reason is FinishReason.LENGTH
    assert by_len.max_model_len == len(prompt_ids[3]) + 4
    assert by_len.output_token_ids == alone[3][:4]
    assert by_len.finish_reason is FinishReason.LENGTH
    flags = [(o.finished, o.finish_reason) for o in outputs if o.req_id == "t"]
    assert flags == [(False, None), (False, None), (True, "length")]
    assert all(o.num_prompt_tokens == len(prompt_ids[0]) for o in outputs if o.req_id == "t")


def test_stop_token_ids(model, eos, prompt_ids, alone) -> None:
    ref = alone[1]
    stop_at = next(i for i in range(2, len(ref)) if ref[i] not in ref[:i])
    engine = _engine(model, eos)
    seq = Sequence("s", list(prompt_ids[1]), _greedy(20, stop_token_ids=(ref[stop_at],)))
    engine.add_request(seq)
    outputs = _drain(engine)
    assert seq.output_token_ids == ref[: stop_at + 1]  # the stop token is the last one
    assert seq.finish_reason is FinishReason.STOP
    assert outputs[-1].finish_reason == "stop" and outputs[-1].finished


def test_eos_ignore_eos_and_min_tokens(model, eos, tokenizer) -> None:
    ids = _chat_ids(tokenizer, FRANCE)
    engine = _engine(model, eos, block_size=16)
    base = Sequence("base", ids, _greedy(16))
    ignore = Sequence("ignore", ids, _greedy(12, ignore_eos=True))
    min_tok = Sequence("min", ids, _greedy(14, min_tokens=11))
    min_stop = Sequence("minstop", ids, _greedy(14, min_tokens=11, stop_token_ids=(30,)))
    for seq in (base, ignore, min_tok, min_stop):
        engine.add_request(seq)
    _drain(engine)

    out = base.output_token_ids
    assert base.finish_reason is FinishReason.STOP
    assert out[-1] in eos and 3 <= len(out) < 11  # premise: the answer ends early with EOS
    k = len(out) - 1

    assert ignore.finish_reason is FinishReason.LENGTH
    assert len(ignore.output_token_ids) == 12
    assert ignore.output_token_ids[: k + 1] == out  # EOS sampled and generation went on

    assert 30 in out[:k]  # premise for min_stop: its stop token would have fired before 11
    for seq, same in ((min_tok, k), (min_stop, out.index(30))):
        got = seq.output_token_ids
        assert got[:same] == out[:same]  # identical until a banned token would be sampled
        assert got[same] != out[same]
        assert len(got) >= 11
        assert not set(got[:11]) & set(eos), got
        if seq.finish_reason is FinishReason.STOP:
            assert got[-1] in eos or got[-1] in seq.params.stop_token_ids
    assert 30 not in min_stop.output_token_ids[:11]
    assert engine.block_pool.num_free_blocks == engine.config.num_blocks


def test_export_kv_then_import_continues_identically(model, eos, story) -> None:
    ids, reference = story
    n_out = 6
    prefill = _engine(model, eos, block_size=16, num_blocks=16)
    seq = Sequence("x", list(ids), _greedy(n_out), export_kv=True)
    prefill.add_request(seq)
    outputs = prefill.step()

    assert len(outputs) == 1
    first = outputs[0]
    assert first.new_token_ids == [reference[0]]
    assert first.finished is False and first.finish_reason is None  # it continues elsewhere
    payload = first.kv_export
    assert payload is not None
    assert payload.num_tokens == len(ids)
    assert payload.num_blocks == -(-len(ids) // 16) == 3
    assert all(tuple(b.shape) == payload.layout.block_shape() for b in payload.blocks)
    assert payload.num_bytes == 3 * 30 * 2 * 16 * 3 * 64 * 4
    assert seq.status is SeqStatus.FINISHED
    assert not prefill.has_unfinished()
    assert prefill.block_pool.num_free_blocks == 16

    decode = _engine(model, eos, block_size=16, num_blocks=24)
    squatters = decode.block_pool.allocate(5)  # imported blocks must land elsewhere than 0..2
    cont = Sequence(
        "x", list(ids), _greedy(n_out), output_token_ids=[first.new_token_ids[0]], kv_import=payload
    )
    decode.add_request(cont)
    outputs = decode.step()
    # the prompt is not recomputed: the very first step is a one-token decode
    assert decode.last_step.is_prefill is False
    assert decode.last_step.num_tokens == 1
    assert min(cont.block_table) >= 5
    outputs += _drain(decode)

    assert cont.output_token_ids == reference[:n_out]
    assert [t for o in outputs for t in o.new_token_ids] == reference[1:n_out]
    assert outputs[-1].finished and outputs[-1].finish_reason == "length"
    decode.block_pool.free(squatters)
    assert decode.block_pool.num_free_blocks == 24


def test_import_rejects_a_foreign_layout(model, eos, story) -> None:
    ids, _ = story
    prefill = _engine(model, eos, block_size=16, num_blocks=8)
    prefill.add_request(Sequence("x", list(ids), _greedy(4), export_kv=True))
    payload = prefill.step()[0].kv_export
    other = ModelRunner(model, num_blocks=8, block_size=8, kv_dtype=torch.float32)
    with pytest.raises(ValueError, match="layout"):
        other.import_blocks([0, 1, 2, 3, 4, 5], payload)


def test_chunked_prefill_gives_the_one_shot_tokens(model, eos, tokenizer, story) -> None:
    """A 5-token budget computes the story prompt in chunks across block boundaries (block
    size 4: chunks start mid-block); its greedy tokens equal the one-shot prefill's."""
    ids, expected = story
    engine = _engine(model, eos, max_num_batched_tokens=5, block_size=4)
    seq = Sequence("chunked", list(ids), _greedy(32))
    engine.add_request(seq)
    chunks = []
    while seq.num_output_tokens == 0:
        engine.step()
        chunks.append(engine.last_step.num_tokens)
    assert chunks == [5] * (len(ids) // 5) + ([len(ids) % 5] if len(ids) % 5 else [])
    _drain(engine)
    assert seq.output_token_ids == expected


def test_mixed_steps_give_each_sequence_its_alone_tokens(model, eos, prompt_ids, alone) -> None:
    """Prompts arriving one per step while others decode, with a budget that chunks them:
    every step mixes decode rows with prompt chunks, and each output equals its alone run."""
    engine = _engine(model, eos, max_num_batched_tokens=6)
    seqs = [
        Sequence(f"m{i}", list(ids), _greedy(n, ignore_eos=True))
        for i, (ids, n) in enumerate(zip(prompt_ids, MAX_TOKENS, strict=True))
    ]
    mixed_steps = 0
    pending = list(seqs)
    while pending or engine.has_unfinished():
        if pending:
            engine.add_request(pending.pop(0))
        decoding = sum(s.num_output_tokens > 0 and s.status is SeqStatus.RUNNING for s in seqs)
        engine.step()
        if engine.last_step.is_prefill and decoding:
            mixed_steps += 1
            assert engine.last_step.num_tokens <= 6
    assert mixed_steps >= 3
    assert [s.output_token_ids for s in seqs] == alone
    assert engine.block_pool.num_free_blocks == engine.config.num_blocks


def test_import_converts_another_float_dtype(model, eos, story) -> None:
    """A bf16 payload (a vLLM prefill) lands in an fp32 pool as its values, converted."""
    ids, _ = story
    prefill = _engine(model, eos, block_size=16, num_blocks=8)
    prefill.add_request(Sequence("x", list(ids), _greedy(4), export_kv=True))
    payload = prefill.step()[0].kv_export
    layout = dataclasses.replace(payload.layout, dtype="bfloat16")
    bf16 = KVPayload(layout, payload.num_tokens, [b.to(torch.bfloat16) for b in payload.blocks])
    pool = ModelRunner(model, num_blocks=8, block_size=16, kv_dtype=torch.float32)
    table = list(range(bf16.num_blocks))
    pool.import_blocks(table, bf16)
    for b, block in zip(table, bf16.blocks, strict=True):
        assert torch.equal(pool.kv_cache[:, :, b], block.float())
