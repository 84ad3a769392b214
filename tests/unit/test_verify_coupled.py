"""Speculative verification of a seeded request draws what plain decoding draws at each
position: the output does not depend on what was drafted, nor on whether the step
speculated, so a seeded request is reproducible with speculation on."""

from __future__ import annotations

import torch

from serving.spec.verify import verify


def _generators(seed: int, k: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in range(k + 1)]


def test_the_emitted_tokens_are_the_plain_draws_whatever_was_drafted() -> None:
    torch.manual_seed(0)
    k, vocab = 4, 50
    for trial in range(200):
        probs = torch.softmax(torch.randn(k + 1, vocab) * 2, dim=-1)
        plain = [int(torch.multinomial(probs[i], 1, generator=g)) for i, g in
                 enumerate(_generators(trial, k))]  # fmt: skip
        accepted = int(torch.randint(0, k + 1, ()))  # drafts right up to here, then wrong
        drafts = plain[:accepted] + [(t + 1) % vocab for t in plain[accepted:k]]
        result = verify(
            probs, None, torch.tensor(drafts), None, False, _generators(trial, k)
        )
        assert result.accepted_tokens == plain[: accepted + 1]
        assert result.num_accepted_drafts == accepted


def test_without_drafts_it_is_the_plain_draw() -> None:
    probs = torch.softmax(torch.randn(1, 30), dim=-1)
    plain = int(torch.multinomial(probs[0], 1, generator=_generators(5, 0)[0]))
    result = verify(probs, None, torch.tensor([], dtype=torch.long), None, False, _generators(5, 0))
    assert result.accepted_tokens == [plain]
