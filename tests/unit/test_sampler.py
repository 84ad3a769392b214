"""The sampler on hand-made logits (no model): greedy, seeds, top-k, top-p, temperature,
min_tokens."""

from __future__ import annotations

import math

import pytest
import torch

from serving.engine.sampler import distributions, sample
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import Sequence

EOS = (2,)


def _seq(num_tokens: int = 4, num_outputs: int = 0, **params) -> Sequence:
    prompt = list(range(10, 10 + num_tokens - num_outputs))
    return Sequence("s", prompt, SamplingParams(**params), output_token_ids=[7] * num_outputs)


def _draw(logits_row: torch.Tensor, n: int, **params) -> list[int]:
    """`n` independent draws, one per distinct position (the seed mixes in the position)."""
    out = []
    for i in range(n):
        seq = _seq(num_tokens=4 + i, **params)
        out.extend(sample(logits_row[None].clone(), [seq], EOS))
    return out


def test_greedy_is_argmax_per_row() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 100, generator=g)
    seqs = [_seq(temperature=0.0) for _ in range(5)]
    assert sample(logits.clone(), seqs, EOS) == logits.argmax(-1).tolist()


def test_mixed_batch_greedy_rows_stay_argmax() -> None:
    logits = torch.zeros(3, 50)
    logits[0, 17] = 5.0
    logits[2, 33] = 5.0
    seqs = [_seq(temperature=0.0), _seq(temperature=1.0, seed=1), _seq(top_k=1)]
    tokens = sample(logits.clone(), seqs, EOS)
    assert tokens[0] == 17 and tokens[2] == 33
    assert 0 <= tokens[1] < 50


def test_same_seed_same_tokens_different_seeds_differ() -> None:
    flat = torch.zeros(1000)
    a = _draw(flat, 20, temperature=1.0, seed=123)
    b = _draw(flat, 20, temperature=1.0, seed=123)
    c = _draw(flat, 20, temperature=1.0, seed=124)
    assert a == b
    assert a != c
    assert len(set(a)) > 10  # a flat distribution really is sampled, not argmax'd


def test_seeded_token_depends_only_on_seed_and_position() -> None:
    flat = torch.zeros(1, 1000)
    lone = sample(flat.clone(), [_seq(num_tokens=9, temperature=1.0, seed=5)], EOS)
    batch = [_seq(num_tokens=3, temperature=1.0, seed=77), _seq(num_tokens=9, seed=5)]
    batched = sample(flat.expand(2, -1).clone(), batch, EOS)
    assert batched[1] == lone[0]


def test_top_k_one_is_greedy() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 64, generator=g)
    seqs = [_seq(temperature=1.5, top_k=1, seed=i) for i in range(8)]
    assert sample(logits.clone(), seqs, EOS) == logits.argmax(-1).tolist()


def test_top_k_restricts_to_the_k_best() -> None:
    logits = torch.arange(20, dtype=torch.float32) * 0.01  # nearly flat, 19 is best
    drawn = _draw(logits, 200, temperature=1.0, top_k=3, seed=9)
    assert set(drawn) == {17, 18, 19}


def test_top_p_keeps_the_nucleus() -> None:
    # top token has probability 0.9; the other 9 share 0.1
    probs = torch.full((10,), 0.1 / 9)
    probs[4] = 0.9
    logits = probs.log()
    assert _draw(logits, 100, temperature=1.0, top_p=0.5, seed=3) == [4] * 100
    # without the cut the tail shows up
    assert set(_draw(logits, 100, temperature=1.0, top_p=1.0, seed=3)) != {4}


def test_top_p_keeps_every_token_up_to_the_threshold() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    drawn = _draw(probs.log(), 300, temperature=1.0, top_p=0.7, seed=11)
    assert set(drawn) == {0, 1}  # 0.5 < 0.7, so token 1 is needed; 0.8 >= 0.7 stops there


def test_temperature_frequencies_follow_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    temperature = 0.7
    n = 4000
    drawn = _draw(logits, n, temperature=temperature, seed=2024)
    expected = torch.softmax(logits / temperature, dim=-1).tolist()
    counts = [drawn.count(i) for i in range(4)]
    chi2 = sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, expected, strict=True))
    assert chi2 < 16.3, (counts, expected)  # p = 0.001 for 3 degrees of freedom
    # and clearly not the temperature-1 distribution
    t1 = torch.softmax(logits, dim=-1).tolist()
    chi2_t1 = sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, t1, strict=True))
    assert chi2_t1 > 50


def test_high_temperature_flattens() -> None:
    logits = torch.tensor([3.0, 0.0])
    drawn = _draw(logits, 1000, temperature=2.0, seed=5)
    p1 = 1 / (1 + math.exp(1.5))  # softmax([1.5, 0])[1]
    assert drawn.count(1) / 1000 == pytest.approx(p1, abs=0.04)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_suppresses_eos_and_stop_tokens(temperature: float) -> None:
    logits = torch.full((1, 10), -30.0)
    logits[0, 2] = 10.0  # EOS
    logits[0, 5] = 9.0  # a stop token
    logits[0, 6] = 1.0
    params = dict(temperature=temperature, min_tokens=3, stop_token_ids=(5,), seed=0)
    for done in range(3):
        assert sample(logits.clone(), [_seq(num_outputs=done, **params)], EOS) == [6]
    # from the min_tokens-th output on, EOS may win again
    assert sample(logits.clone(), [_seq(num_outputs=3, temperature=0.0, min_tokens=3)], EOS) == [2]


def test_ignore_eos_alone_does_not_suppress_eos_in_the_sampler() -> None:
    # ignore_eos is the engine's business (it does not stop); the sampler may still pick EOS
    logits = torch.full((1, 10), -5.0)
    logits[0, 2] = 10.0
    assert sample(logits.clone(), [_seq(temperature=0.0, ignore_eos=True)], EOS) == [2]


def test_distributions_ban_stops_by_position() -> None:
    """Row j of a speculative step's logits comes after j more outputs: with 2 outputs and
    min_tokens 4, rows 0 and 1 may not pick EOS or a stop id, row 2 may."""
    logits = torch.zeros(3, 10)
    seq = _seq(num_outputs=2, temperature=0.0, min_tokens=4, stop_token_ids=(5,))
    dist = distributions(logits, seq, EOS, [7, 7])
    assert dist is logits  # greedy: the banned logits themselves, for their argmax
    assert torch.isinf(dist[:2, [2, 5]]).all() and not torch.isinf(dist[2]).any()
    probs = distributions(torch.zeros(3, 10), _seq(num_outputs=2, min_tokens=4), EOS, [7, 7])
    assert torch.allclose(probs.sum(-1), torch.ones(3))
    assert probs[0, 2] == 0 and probs[1, 2] == 0 and probs[2, 2] > 0
