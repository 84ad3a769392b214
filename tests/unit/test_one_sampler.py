"""Plain and speculative steps share one sampler and one commit path: on a tiny random
Llama (no download), greedy and seeded sampled tokens are pinned to what the engine gave
before the two were merged, so the refactor is bit-identical; a multi-token speculative
step stops at the first token that finishes the sequence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from serving.engine.engine import EngineConfig, LLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import FinishReason, Sequence
from serving.models.loader import load_model
from serving.spec.decode_step import SpecDecodeStep
from serving.spec.proposer import NgramProposer, TruncatedDraft

V = 32
EOS = (2,)

# One batch covering every knob of the sampler: greedy, temperature, top-k, top-p, seeds,
# min_tokens with stop ids; different lengths so rows leave at different steps.
REQUESTS: list[tuple[list[int], SamplingParams]] = [
    ([3, 7, 5], SamplingParams(max_tokens=12, temperature=0.0)),
    ([9, 4, 11, 6], SamplingParams(max_tokens=12, temperature=0.8, seed=7)),
    ([5, 5, 8], SamplingParams(max_tokens=10, temperature=1.0, top_k=5, seed=11)),
    ([12, 3], SamplingParams(max_tokens=11, temperature=1.2, top_p=0.7, seed=3)),
    (
        [6, 13, 6, 13],
        SamplingParams(max_tokens=12, temperature=1.0, seed=5, min_tokens=6, stop_token_ids=(4,)),
    ),
    ([7, 8, 9], SamplingParams(max_tokens=9, temperature=0.0, min_tokens=4, stop_token_ids=(4,))),
    ([10, 20, 30], SamplingParams(max_tokens=12, temperature=0.7, top_k=8, top_p=0.9, seed=42)),
    # r0 and r1 again: greedy stopping mid-draft on a stop id, and r1's EOS (its 5th token)
    # banned by min_tokens
    ([3, 7, 5], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(23,))),
    ([9, 4, 11, 6], SamplingParams(max_tokens=12, temperature=0.8, seed=7, min_tokens=6)),
]


class AlwaysSpeculate:
    def should_speculate(self, num_seqs: int) -> bool:
        return True

    def observe(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # peaked enough that EOS and stop ids come up, not one-hot
        w = model.lm_head.weight
        w.mul_(8.0)
        # token 1 took most of the mass: hand part of it to EOS (2) and the stop id (4)
        w[2] = 0.7 * w[1]
        w[4] = 0.6 * w[1]
        w[1] *= 0.3
    folder = tmp_path_factory.mktemp("tiny-one-sampler")
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _engine(folder: Path, spec: str | None) -> LLMEngine:
    model = load_model(folder, torch.float32)
    cfg = EngineConfig(num_blocks=128, block_size=4, max_num_seqs=16, max_model_len=48)
    engine = LLMEngine(model, cfg, EOS)
    if spec is not None:
        proposer = TruncatedDraft(engine.runner, 1) if spec == "truncated" else NgramProposer(2, 1)
        engine.attach_spec(SpecDecodeStep(engine, proposer, k_max=3, gate=AlwaysSpeculate()))
    return engine


def run(folder: Path, spec: str | None) -> dict[str, tuple[list[int], str]]:
    torch.manual_seed(1234)  # unseeded draws are not pinned, but keep the run reproducible
    engine = _engine(folder, spec)
    for i, (prompt, params) in enumerate(REQUESTS):
        engine.add_request(Sequence(f"r{i}", list(prompt), params))
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    for _ in range(200):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            tokens.setdefault(out.req_id, []).extend(out.new_token_ids)
            if out.finished:
                reasons[out.req_id] = str(out.finish_reason)
    assert not engine.has_unfinished()
    assert engine.block_pool.num_free_blocks == engine.block_pool.num_blocks
    if spec is not None:
        assert engine.spec is not None and engine.spec.stats.num_spec_steps > 0
    return {r: (tokens[r], reasons[r]) for r in sorted(tokens)}


# Captured from the engine before plain and speculative steps shared a sampler and a commit
# path (2 separate copies then); any change here is a change of seeded output. Speculative
# steps give the same tokens: greedy rows keep the target's argmax, and seeded rows draw at
# each position what plain decoding draws there (`serving.spec.verify`, coupled draws), so
# a seeded request is reproducible whether or not, and however far, a step speculated.
PLAIN: dict[str, tuple[list[int], str]] = {
    "r0": ([27, 18, 3, 28, 18, 23, 30, 8, 22, 23, 30, 8], "length"),
    "r1": ([23, 25, 29, 29, 2], "stop"),
    "r2": ([9, 10, 19, 10, 18, 9, 19, 2], "stop"),
    "r3": ([17, 13, 8, 18, 9, 21, 14, 12, 8, 18, 9], "length"),
    "r4": ([6, 13, 25, 29, 7, 10, 7, 6, 14, 15, 14, 16], "length"),
    "r5": ([12, 3, 28, 18, 6, 23, 25, 23, 30], "length"),
    "r6": ([4, 27, 12, 2], "stop"),
    "r7": ([27, 18, 3, 28, 18, 23], "stop"),
    "r8": ([23, 25, 29, 29, 29, 4, 29, 29, 10, 3, 6, 13], "length"),
}


@pytest.mark.parametrize("spec", [None, "truncated", "ngram"])
def test_tokens_are_pinned(tiny: Path, spec: str | None) -> None:
    assert run(tiny, spec) == PLAIN


def test_commit_stops_at_the_first_finishing_token(tiny: Path) -> None:
    engine = _engine(tiny, None)
    params = SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=(4,), min_tokens=3)
    seq = Sequence("c", [3, 7, 5], params)
    engine.add_request(seq)
    engine.step()  # the prefill: one output token, the prompt computed
    assert seq.num_output_tokens == 1 and seq.num_computed_tokens == 3
    # as a speculative step keeping 3 tokens: 4, the 2nd output, is below min_tokens (3)
    out = engine.commit(seq, [4, 9, 11], num_input_tokens=1)
    assert out.new_token_ids == [4, 9, 11] and not out.finished
    assert seq.num_computed_tokens == 3 + 1 + 2  # the newest and 2 verified drafts
    # a stop id in the middle ends the sequence there: the tokens after it are dropped
    out = engine.commit(seq, [12, 4, 13], num_input_tokens=1)
    assert out.new_token_ids == [12, 4]
    assert out.finished and out.finish_reason == FinishReason.STOP.value
    assert seq.output_token_ids[-2:] == [12, 4] and seq.finish_reason is FinishReason.STOP
    assert not engine.has_unfinished()
    assert engine.block_pool.num_free_blocks == engine.block_pool.num_blocks


def test_commit_finishes_on_max_tokens(tiny: Path) -> None:
    engine = _engine(tiny, None)
    seq = Sequence("m", [3, 7, 5], SamplingParams(max_tokens=3, temperature=0.0))
    engine.add_request(seq)
    engine.step()
    out = engine.commit(seq, [9, 10, 11, 12])
    assert out.new_token_ids == [9, 10] and out.finish_reason == FinishReason.LENGTH.value


def test_attach_spec_checks_its_engine(tiny: Path) -> None:
    engine, other = _engine(tiny, None), _engine(tiny, None)
    spec = SpecDecodeStep(other, NgramProposer(2, 1))
    with pytest.raises(ValueError):
        engine.attach_spec(spec)
    other.attach_spec(spec)
    assert other.spec is spec
    with pytest.raises(RuntimeError):
        other.attach_spec(SpecDecodeStep(other, NgramProposer(2, 1)))
    with pytest.raises(AttributeError):  # read-only: attach_spec is the one way in
        other.spec = None  # type: ignore[misc]
