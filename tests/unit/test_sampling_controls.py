"""Sampling controls on hand-made logits (penalties, logit_bias, min_p, bad_words), the
speculative verifier seeing the same adjusted distribution as the plain sampler, and
logprobs equal to a log-softmax of the raw logits; then, on a tiny random Llama, greedy
output with penalties equal with and without speculation, and prompt logprobs equal to
transformers' over chunked prefill."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import transformers

from serving.engine.logits_processors import Row, process
from serving.engine.logprobs import pick, raw_logprobs
from serving.engine.sampler import distributions, sample
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import Sequence
from tests.unit import test_one_sampler as one

EOS, _engine = one.EOS, one._engine
tiny = one.tiny  # the tiny random Llama's folder (a fixture)

V = 10


def _seq(prompt=(8, 9), outputs=(), **params) -> Sequence:
    return Sequence("s", list(prompt), SamplingParams(temperature=0.0, **params), list(outputs))


def _greedy(logits: list[float], seq: Sequence) -> int:
    return sample(torch.tensor([logits]), [seq], EOS)[0]


# token 3 best by a little, token 4 next
BASE = [0.0, 0.0, -9.0, 2.0, 1.5, 1.0, 0.5, 0.0, 0.0, 0.0]


def test_no_controls_no_change() -> None:
    logits = torch.tensor([BASE])
    process(logits, [Row(_seq(outputs=(3, 3)))], EOS)
    assert torch.equal(logits, torch.tensor([BASE]))


def test_presence_penalty_steers_away_from_an_output_token() -> None:
    assert _greedy(BASE, _seq(outputs=(3,))) == 3
    assert _greedy(BASE, _seq(outputs=(3,), presence_penalty=1.0)) == 4
    assert _greedy(BASE, _seq(prompt=(3,), presence_penalty=1.0)) == 3  # output only
    assert _greedy(BASE, _seq(outputs=(4,), presence_penalty=-1.0)) == 4  # negative: favour


def test_frequency_penalty_grows_with_the_count() -> None:
    assert _greedy(BASE, _seq(outputs=(3,), frequency_penalty=0.4)) == 3  # 2.0 - 0.4 > 1.5
    assert _greedy(BASE, _seq(outputs=(3, 3), frequency_penalty=0.4)) == 4  # 2.0 - 0.8
    logits = torch.tensor([BASE])
    seq = _seq(outputs=(3, 3, 5), frequency_penalty=0.5, presence_penalty=0.25)
    process(logits, [Row(seq)], EOS)
    assert logits[0, 3] == pytest.approx(2.0 - 1.0 - 0.25)
    assert logits[0, 5] == pytest.approx(1.0 - 0.5 - 0.25)


def test_repetition_penalty_divides_positive_multiplies_negative_prompt_and_output() -> None:
    logits = torch.tensor([BASE])
    seq = _seq(prompt=(3, 2), outputs=(5,), repetition_penalty=2.0)
    process(logits, [Row(seq)], EOS)
    assert logits[0, 3] == 1.0 and logits[0, 5] == 0.5  # positive: halved (prompt, output)
    assert logits[0, 2] == -18.0  # negative: doubled
    assert logits[0, 4] == 1.5  # not seen: untouched
    assert _greedy(BASE, _seq(prompt=(3,), repetition_penalty=2.0)) == 4


def test_logit_bias_adds_per_token() -> None:
    assert _greedy(BASE, _seq(logit_bias=((3, -100.0),))) == 4
    assert _greedy(BASE, _seq(logit_bias=((7, 100.0),))) == 7
    logits = torch.tensor([BASE])
    process(logits, [Row(_seq(logit_bias=((5, 0.5),)))], EOS)
    assert logits[0, 5] == 1.5


def test_bad_words_ban_the_last_token_after_the_rest() -> None:
    assert _greedy(BASE, _seq(bad_words_ids=((3,),))) == 4  # one token: always
    words = ((6, 3),)
    assert _greedy(BASE, _seq(outputs=(1,), bad_words_ids=words)) == 3
    assert _greedy(BASE, _seq(outputs=(1, 6), bad_words_ids=words)) == 4
    # the prompt does not count (vLLM: output tokens only)
    assert _greedy(BASE, _seq(prompt=(6,), bad_words_ids=words)) == 3


def test_min_p_drops_the_unlikely() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 3.0, 2.5, -2.0, -5.0, -5.0, -5.0, -5.0]])
    seq = Sequence("s", [8], SamplingParams(temperature=1.0, min_p=0.5))
    probs = distributions(logits.clone(), seq, EOS, [])[0]
    # p(4)/p(3) = e^-0.5 = 0.61 >= 0.5 stays; e^-3 for tokens 0..2 goes
    assert probs[3] > 0 and probs[4] > 0
    assert probs[[0, 1, 2, 5, 6]].sum() == 0
    assert probs.sum() == pytest.approx(1.0)


def test_batch_rows_apart() -> None:
    """One batch: each row gets its own request's controls, the plain one nothing."""
    seqs = [
        _seq(outputs=(3,), presence_penalty=1.0),
        _seq(outputs=(3,)),
        _seq(logit_bias=((7, 100.0),)),
        _seq(prompt=(3,), repetition_penalty=2.0),
    ]
    assert sample(torch.tensor([BASE] * 4), seqs, EOS) == [4, 3, 7, 4]


def test_verification_rows_match_the_plain_sampler() -> None:
    """Row j of a speculative step (after draft[:j]) is processed exactly as a plain step
    would process it once draft[:j] were output tokens: penalties, bias, bad words and
    min_tokens, greedy and sampled."""
    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    for trial in range(30):
        params = dict(
            temperature=rng.choice([0.0, 0.8]),
            presence_penalty=rng.uniform(-1, 1),
            frequency_penalty=rng.uniform(-1, 1),
            repetition_penalty=rng.uniform(0.5, 2.0),
            logit_bias=((rng.randrange(V), rng.uniform(-3, 3)),),
            bad_words_ids=((rng.randrange(V), rng.randrange(V)),),
            min_tokens=rng.randrange(5),
            min_p=rng.choice([0.0, 0.1]),
            top_k=rng.choice([0, 5]),
        )
        prompt = [rng.randrange(V) for _ in range(4)]
        outputs = [rng.randrange(V) for _ in range(rng.randrange(3))]
        draft = [rng.randrange(V) for _ in range(3)]
        logits = torch.randn(4, V, generator=g)
        seq = Sequence("s", prompt, SamplingParams(**params), list(outputs))
        spec = distributions(logits.clone(), seq, EOS, draft)
        for j in range(4):
            plain = Sequence("s", prompt, SamplingParams(**params), outputs + draft[:j])
            row = distributions(logits[j : j + 1].clone(), plain, EOS, [])[0]
            assert torch.allclose(spec[j], row, equal_nan=True), (trial, j)


def test_logprobs_are_the_raw_log_softmax() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=g)
    ref = torch.log_softmax(logits, dim=-1)
    out = pick(raw_logprobs(logits), [4, 7, 9], num_top=5)
    for row, lp in enumerate(out):
        assert lp.logprob == pytest.approx(float(ref[row, lp.token_id]), abs=1e-6)
        values, ids = torch.topk(ref[row], 5)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-6)
    assert all(lp.top == () for lp in pick(raw_logprobs(logits), [1, 2, 3], 0))


# --------------------------------------------------------------------------- the engine

PENALIZED = [
    SamplingParams(max_tokens=14, temperature=0.0, frequency_penalty=1.5),
    SamplingParams(max_tokens=14, temperature=0.0, presence_penalty=1.0, repetition_penalty=1.3),
    SamplingParams(max_tokens=14, temperature=0.0, bad_words_ids=((27, 18), (23,))),
    SamplingParams(max_tokens=14, temperature=0.0, logit_bias=((3, 2.0),), logprobs=3),
    SamplingParams(max_tokens=14, temperature=0.9, seed=5, frequency_penalty=0.8, logprobs=0),
]


def _run(folder: Path, spec: str | None) -> dict[str, tuple]:
    engine = _engine(folder, spec)
    for i, params in enumerate(PENALIZED):
        engine.add_request(Sequence(f"p{i}", [3, 7, 5, 3, 7], params))
    out: dict[str, tuple[list[int], list]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            tokens, lps = out.setdefault(o.req_id, ([], []))
            tokens.extend(o.new_token_ids)
            lps.extend(o.logprobs or [])
    return out


def test_penalties_same_tokens_and_logprobs_with_speculation(tiny: Path) -> None:
    plain = _run(tiny, None)
    assert plain["p0"][0] != _run_unpenalized(tiny)  # the penalty did change the answer
    for spec in ("ngram", "truncated"):
        specd = _run(tiny, spec)
        for req in ("p0", "p1", "p2", "p3"):  # greedy: token for token
            assert specd[req][0] == plain[req][0], (spec, req)
        for a, b in zip(specd["p3"][1], plain["p3"][1], strict=True):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
    tokens, lps = plain["p3"]
    assert [lp.token_id for lp in lps] == tokens and all(len(lp.top) == 3 for lp in lps)
    assert len(plain["p4"][1]) == len(plain["p4"][0])  # logprobs 0: the token's alone
    assert all(lp.top == () for lp in plain["p4"][1])
    out = [3, 7, 5, 3, 7] and plain["p2"][0]
    assert all(out[i : i + 2] != [27, 18] for i in range(len(out))) and 23 not in out


def _run_unpenalized(folder: Path) -> list[int]:
    engine = _engine(folder, None)
    params = SamplingParams(max_tokens=14, temperature=0.0)
    engine.add_request(Sequence("u", [3, 7, 5, 3, 7], params))
    tokens: list[int] = []
    while engine.has_unfinished():
        for o in engine.step():
            tokens.extend(o.new_token_ids)
    return tokens


def test_prompt_logprobs_over_chunks_equal_transformers(tiny: Path, monkeypatch) -> None:
    from serving.engine import engine as engine_module
    from serving.engine.engine import EngineConfig, LLMEngine
    from serving.models.loader import load_model

    monkeypatch.setattr(engine_module, "PROMPT_LOGPROBS_ROWS", 3)  # pieces within chunks

    prompt = [3, 7, 5, 9, 11, 4, 6, 13, 6, 13, 8, 1]
    cfg = EngineConfig(num_blocks=64, block_size=4, max_num_batched_tokens=5, max_model_len=48)
    engine = LLMEngine(load_model(tiny, torch.float32), cfg, EOS)
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2, logprobs=1)
    engine.add_request(Sequence("q", prompt, params))
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    assert outs[0].prompt_logprobs is not None and outs[0].prompt_logprobs[0] is None
    got = outs[0].prompt_logprobs[1:]
    assert len(got) == len(prompt) - 1 and all(o.prompt_logprobs is None for o in outs[1:])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0], dim=-1)
    for p, lp in enumerate(got):
        assert lp is not None and lp.token_id == prompt[p + 1]
        assert lp.logprob == pytest.approx(float(ref[p, prompt[p + 1]]), abs=1e-4)
        assert [t for t, _ in lp.top] == torch.topk(ref[p], 2).indices.tolist()
    first = outs[0].logprobs[0]
    assert first.token_id == int(ref[-1].argmax())
    assert first.logprob == pytest.approx(float(ref[-1].max()), abs=1e-4)
