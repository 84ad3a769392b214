"""At temperature > 0, tokens emitted by speculative decoding inside the engine follow the
target model's distribution: a tiny random Llama with a 16-token vocabulary, thousands of
sampled continuations (fixed seed), chi-square against the exact marginals computed with
transformers. The same test fails for a biased rule (always accepting the draft)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers

import serving.spec.decode_step as decode_step
from serving.engine.engine import EngineConfig, LLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import Sequence
from serving.models.loader import load_model
from serving.spec.decode_step import SpecDecodeStep
from serving.spec.proposer import TruncatedDraft
from serving.spec.verify import VerifyResult

V = 16
PROMPT = [3, 7, 5]
N = 4000
P_MIN = 1e-3


class AlwaysSpeculate:
    def should_speculate(self, num_seqs: int) -> bool:
        return True

    def observe(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, transformers.LlamaForCausalLM]:
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
    with torch.no_grad():  # peaked, position-dependent distributions instead of near-uniform
        model.lm_head.weight.mul_(60.0)
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


@torch.no_grad()
def exact_marginals(model: transformers.LlamaForCausalLM) -> tuple[torch.Tensor, torch.Tensor]:
    """P(t2) and P(t3) of the continuation, summing over the earlier sampled tokens."""
    def next_probs(seqs: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model(seqs).logits[:, -1].double(), dim=-1)

    p1 = next_probs(torch.tensor([PROMPT]))[0]  # [V]
    firsts = torch.tensor([PROMPT + [a] for a in range(V)])
    p2_given = next_probs(firsts)  # [V(t1), V(t2)]
    p2 = p1 @ p2_given
    pairs = torch.tensor([PROMPT + [a, b] for a in range(V) for b in range(V)])
    p3_given = next_probs(pairs).view(V, V, V)
    p3 = torch.einsum("a,ab,abc->c", p1, p2_given, p3_given)
    return p2, p3


def chi2_pvalue(samples: list[int], probs: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(samples), minlength=V).double()
    expected = probs.double() * len(samples)
    support = expected > 1e-9
    if counts[~support].sum() > 0:
        return 0.0
    stat = ((counts - expected)[support] ** 2 / expected[support]).sum()
    df = torch.tensor((int(support.sum()) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, stat / 2))


def _sample(folder: Path, seeded: bool = False) -> tuple[list[list[int]], SpecDecodeStep]:
    torch.manual_seed(1234)
    model = load_model(folder, torch.float32)
    cfg = EngineConfig(num_blocks=512, block_size=4, max_num_seqs=64, max_model_len=32)
    engine = LLMEngine(model, cfg, (2,))
    engine.attach_spec(
        SpecDecodeStep(engine, TruncatedDraft(engine.runner, 1), k_max=3, gate=AlwaysSpeculate())
    )
    params = SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True)
    for i in range(N):  # seeded: request i has seed i (verified with coupled draws)
        seeded_params = replace(params, seed=i) if seeded else params
        engine.add_request(Sequence(f"s{i}", list(PROMPT), seeded_params))
    outputs: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.req_id, []).extend(out.new_token_ids)
    return list(outputs.values()), engine.spec


@pytest.mark.parametrize("seeded", [False, True], ids=["rejection", "seeded-coupled"])
def test_speculative_samples_follow_the_target(tiny, seeded: bool) -> None:
    folder, reference = tiny
    p2, p3 = exact_marginals(reference)
    samples, spec = _sample(folder, seeded)
    assert all(len(s) == 4 for s in samples)
    # tokens 2 and 3 come out of verification (token 1 out of the prefill step)
    assert spec.stats.num_spec_steps > 0
    assert 0 < spec.stats.num_accepted_tokens < spec.stats.num_draft_tokens
    p_second = chi2_pvalue([s[1] for s in samples], p2)
    p_third = chi2_pvalue([s[2] for s in samples], p3)
    print(f"p-values: second {p_second:.3g}, third {p_third:.3g}")
    assert p_second > P_MIN and p_third > P_MIN


def test_a_biased_rule_fails_the_same_test(tiny, monkeypatch) -> None:
    folder, reference = tiny
    p2, p3 = exact_marginals(reference)

    def always_accept(target_probs, draft_probs, draft_tokens, generator, greedy, _coupled):
        drafts = draft_tokens.tolist()
        bonus = int(torch.multinomial(target_probs[len(drafts)], 1, generator=generator))
        return VerifyResult(drafts + [bonus], len(drafts))

    monkeypatch.setattr(decode_step, "verify", always_accept)
    samples, _ = _sample(folder)
    p_second = chi2_pvalue([s[1] for s in samples], p2)
    p_third = chi2_pvalue([s[2] for s in samples], p3)
    print(f"biased p-values: second {p_second:.3g}, third {p_third:.3g}")
    assert min(p_second, p_third) < P_MIN
