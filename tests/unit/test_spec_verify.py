"""Speculative verification (serving/spec/verify.py): greedy equals the target argmax, and
stochastic verification reproduces the target distribution (chi-square), while a biased
rule fails the same test, so the test has teeth."""

from __future__ import annotations

import pytest
import torch

from serving.spec.verify import VerifyResult, verify

V = 6
N = 20_000
P_MIN = 1e-3

# target p_0, p_1 (drafted positions) and p_2 (bonus); draft q_0, q_1 deliberately different.
# p_1 gives token 0 zero mass while q_1 favours it: such drafts must always be rejected.
P = torch.tensor(
    [
        [0.30, 0.25, 0.20, 0.15, 0.07, 0.03],
        [0.00, 0.10, 0.10, 0.20, 0.25, 0.35],
        [0.40, 0.10, 0.10, 0.10, 0.10, 0.20],
    ],
    dtype=torch.float64,
)
Q = torch.tensor(
    [
        [0.05, 0.10, 0.15, 0.20, 0.25, 0.25],
        [0.40, 0.30, 0.10, 0.10, 0.05, 0.05],
    ],
    dtype=torch.float64,
)


def chi2_pvalue(samples: list[int], probs: torch.Tensor) -> float:
    """Pearson goodness of fit of `samples` to `probs`; p-value = Q(df/2, stat/2), the upper
    regularized gamma function. A sample in a zero-probability bin is an outright failure."""
    counts = torch.bincount(torch.tensor(samples), minlength=V).double()
    expected = probs.double() * len(samples)
    support = expected > 0
    if counts[~support].sum() > 0:
        return 0.0
    stat = ((counts - expected)[support] ** 2 / expected[support]).sum()
    df = torch.tensor((int(support.sum()) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, stat / 2))


def test_chi2_pvalue_matches_closed_form() -> None:
    # df = 2: survival function is exp(-x/2)
    stat = torch.tensor(3.0, dtype=torch.float64)
    got = torch.special.gammaincc(torch.tensor(1.0, dtype=torch.float64), stat / 2)
    assert float(got) == pytest.approx(float(torch.exp(-stat / 2)))


@pytest.fixture(scope="module")
def stochastic_runs() -> list[VerifyResult]:
    gen = torch.Generator().manual_seed(1234)
    drafts = torch.stack(
        [torch.multinomial(Q[i], N, replacement=True, generator=gen) for i in range(2)]
    )
    return [verify(P, Q, drafts[:, t], gen, greedy=False) for t in range(N)]


def test_first_token_follows_target(stochastic_runs: list[VerifyResult]) -> None:
    first = [r.accepted_tokens[0] for r in stochastic_runs]
    pval = chi2_pvalue(first, P[0])
    print(f"correct rule, first token: p-value {pval:.4f}")
    assert pval > P_MIN


def test_later_positions_follow_target_given_acceptance(stochastic_runs) -> None:
    second = [r.accepted_tokens[1] for r in stochastic_runs if r.num_accepted_drafts >= 1]
    bonus = [r.accepted_tokens[2] for r in stochastic_runs if r.num_accepted_drafts == 2]
    assert len(second) > 2_000 and len(bonus) > 500
    p2, p3 = chi2_pvalue(second, P[1]), chi2_pvalue(bonus, P[2])
    print(f"correct rule, second token | accepted: p-value {p2:.4f}; bonus: {p3:.4f}")
    assert p2 > P_MIN and p3 > P_MIN


def test_result_shape(stochastic_runs: list[VerifyResult]) -> None:
    for r in stochastic_runs[:500]:
        assert len(r.accepted_tokens) == r.num_accepted_drafts + 1
        assert 0 <= r.num_accepted_drafts <= 2


def test_biased_rules_fail_the_same_test() -> None:
    gen = torch.Generator().manual_seed(99)
    drafts = torch.multinomial(Q[0], N, replacement=True, generator=gen)
    # always accept the draft: the first token follows q, not p
    p_always = chi2_pvalue(drafts.tolist(), P[0])
    # classic bug: on rejection resample from p instead of the residual max(0, p - q)
    u = torch.rand(N, generator=gen, dtype=torch.float64)
    accept = u * Q[0][drafts] < P[0][drafts]
    resampled = torch.multinomial(P[0], N, replacement=True, generator=gen)
    p_resample = chi2_pvalue(torch.where(accept, drafts, resampled).tolist(), P[0])
    print(f"biased: always-accept p-value {p_always:.3g}, resample-from-p {p_resample:.3g}")
    assert p_always < P_MIN and p_resample < P_MIN


def test_deterministic_draft_follows_target() -> None:
    """draft_probs=None (n-gram): q is a point mass on the drafted token."""
    gen = torch.Generator().manual_seed(7)
    draft = torch.tensor([1, 5])
    runs = [verify(P, None, draft, gen, greedy=False) for _ in range(N // 2)]
    pval = chi2_pvalue([r.accepted_tokens[0] for r in runs], P[0])
    second = [r.accepted_tokens[1] for r in runs if r.num_accepted_drafts >= 1]
    assert all(
        r.accepted_tokens[: r.num_accepted_drafts] == [1, 5][: r.num_accepted_drafts] for r in runs
    )
    assert pval > P_MIN and chi2_pvalue(second, P[1]) > P_MIN


def test_degenerate_residual_falls_back_to_target() -> None:
    # q >= p everywhere (an unnormalized draft row): a rejection leaves an all-zero residual
    p = torch.tensor([[0.5, 0.5, 0, 0, 0, 0], [0, 0, 1.0, 0, 0, 0]], dtype=torch.float64)
    q = torch.tensor([[1.0, 0.5, 0, 0, 0, 0]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    rejected = [verify(p, q, torch.tensor([0]), gen, greedy=False) for _ in range(200)]
    rejected = [r for r in rejected if r.num_accepted_drafts == 0]
    assert rejected and all(r.accepted_tokens[0] in (0, 1) for r in rejected)


ARGMAX = [3, 1, 4]


def _greedy_target() -> torch.Tensor:
    probs = torch.full((3, V), 0.1)
    for i, t in enumerate(ARGMAX):
        probs[i, t] = 0.5
    return probs / probs.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize(
    ("draft", "emitted", "num_accepted"),
    [
        ([3, 1], [3, 1, 4], 2),  # all accepted, bonus argmax
        ([0, 1], [3], 0),  # first rejected: target argmax replaces it
        ([3, 2], [3, 1], 1),  # second rejected
        ([5, 5], [3], 0),
    ],
)
def test_greedy_emits_target_argmax(draft, emitted, num_accepted) -> None:
    # a draft distribution that strongly prefers the draft must not matter
    q = torch.full((2, V), 0.01)
    q[0, draft[0]], q[1, draft[1]] = 0.95, 0.95
    r = verify(_greedy_target(), q, torch.tensor(draft), None, greedy=True)
    assert r == VerifyResult(emitted, num_accepted)


def test_greedy_prefix_of_argmax_for_any_draft() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        draft = torch.randint(0, V, (2,), generator=gen)
        r = verify(_greedy_target(), None, draft, gen, greedy=True)
        assert r.accepted_tokens == ARGMAX[: len(r.accepted_tokens)]


def test_no_draft_emits_one_token() -> None:
    p = _greedy_target()[2:]
    assert verify(
        p, None, torch.tensor([], dtype=torch.long), None, greedy=True
    ).accepted_tokens == [4]
    r = verify(p, None, torch.tensor([], dtype=torch.long), torch.Generator(), greedy=False)
    assert r.num_accepted_drafts == 0 and len(r.accepted_tokens) == 1


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        verify(P[:2], Q, torch.tensor([0, 1]), None, greedy=False)
    with pytest.raises(ValueError):
        verify(P, Q[:1], torch.tensor([0, 1]), None, greedy=False)
