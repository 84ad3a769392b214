"""Our paged-KV Llama matches transformers' logits on the default model, in fp32.

Every forward goes through the engine's `ModelRunner` (its `_prepare` builds the token
layout and `AttentionMetadata`), with deliberately scrambled block tables so that a wrong
slot or block-table lookup cannot go unnoticed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving.engine.model_runner import ModelRunner
from serving.engine.scheduler import SchedulerOutput
from serving.models.loader import load_model
from tests.unit.runner_checks import all_logits, max_diff, seq_with_blocks

ATOL = 1e-3
BLOCK_SIZE = 16
NUM_BLOCKS = 12

TEXT_A = (
    "Paged attention stores keys and values in fixed-size blocks, so a sequence can grow "
    "without copying its cache. The scheduler hands out blocks as tokens arrive and frees "
    "them the moment a request finishes."
)
TEXT_B = (
    "The quick brown fox jumps over the lazy dog, then naps under a tall oak tree by the river."
)


@pytest.fixture(scope="module")
def ours(model_folder: Path):
    return load_model(model_folder, torch.float32)


@pytest.fixture(scope="module")
def hf(model_folder: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ids(tokenizer) -> dict[str, list[int]]:
    a = tokenizer(TEXT_A)["input_ids"]
    b = tokenizer(TEXT_B)["input_ids"]
    # A spans three 16-token blocks; B two; their lengths differ (decode padding is exercised).
    assert 2 * BLOCK_SIZE < len(a) <= 3 * BLOCK_SIZE, len(a)
    assert BLOCK_SIZE < len(b) < len(a) - 5, len(b)
    return {"a": a, "b": b}


@pytest.fixture(scope="module")
def hf_logits(hf, ids) -> dict[str, torch.Tensor]:
    """transformers' full-sequence logits `[len, vocab]` for each text."""
    with torch.no_grad():
        return {k: hf(torch.tensor([v])).logits[0].float() for k, v in ids.items()}


def _runner(model) -> ModelRunner:
    return ModelRunner(model, NUM_BLOCKS, BLOCK_SIZE, torch.float32)


def test_reference_logits_are_not_degenerate(hf_logits, ids) -> None:
    # Guards the comparisons below against a vacuous pass (e.g. all-zero logits).
    ref = hf_logits["a"]
    assert ref.shape == (len(ids["a"]), 49152)
    assert ref.std().item() > 1.0
    assert (ref[1:] - ref[:-1]).abs().max().item() > 1.0


def test_full_prefill_matches_hf(ours, hf_logits, ids) -> None:
    runner = _runner(ours)
    a = seq_with_blocks("a", ids["a"], [9, 3, 6])
    b = seq_with_blocks("b", ids["b"], [1, 10])
    batch = SchedulerOutput([a, b], [len(ids["a"]), len(ids["b"])], is_prefill=True)

    logits = all_logits(runner, batch)
    na = len(ids["a"])
    assert max_diff(logits[:na], hf_logits["a"]) < ATOL
    assert max_diff(logits[na:], hf_logits["b"]) < ATOL

    # `execute` returns exactly the rows at each sequence's last token.
    last = runner.execute(batch)
    assert last.shape == (2, 49152)
    assert max_diff(last[0], hf_logits["a"][-1]) < ATOL
    assert max_diff(last[1], hf_logits["b"][-1]) < ATOL


def test_token_by_token_decode_matches_hf(ours, hf_logits, ids) -> None:
    """A short prefill, then one token per step for two sequences of different lengths."""
    runner = _runner(ours)
    prefix = 5
    a = seq_with_blocks("a", ids["a"], [7, 2, 5])
    b = seq_with_blocks("b", ids["b"], [4, 0])  # block 0 doubles as the block-table padding id
    runner.execute(SchedulerOutput([a, b], [prefix, prefix], is_prefill=True))
    a.num_computed_tokens = b.num_computed_tokens = prefix

    checked = {"a": 0, "b": 0}
    worst = 0.0
    while True:
        live = [s for s in (a, b) if s.num_computed_tokens < len(s.prompt_token_ids)]
        if not live:
            break
        batch = SchedulerOutput(live, [1] * len(live), is_prefill=False)
        _, _, meta = runner._prepare(batch)
        assert meta.all_decode
        logits = runner.execute(batch)
        for row, seq in enumerate(live):
            pos = seq.num_computed_tokens
            worst = max(worst, max_diff(logits[row], hf_logits[seq.req_id][pos]))
            seq.num_computed_tokens += 1
            checked[seq.req_id] += 1
    assert checked == {"a": len(ids["a"]) - prefix, "b": len(ids["b"]) - prefix}
    assert worst < ATOL


def test_decode_cache_holds_the_same_kv_as_prefill(ours, ids) -> None:
    """Token-by-token decode writes the same K/V into its blocks as one prefill does."""
    n = 2 * BLOCK_SIZE + 3
    tokens = ids["a"][:n]
    prefill_runner, decode_runner = _runner(ours), _runner(ours)
    table_p, table_d = [0, 1, 2], [11, 4, 8]
    seq = seq_with_blocks("p", tokens, table_p)
    prefill_runner.execute(SchedulerOutput([seq], [n], is_prefill=True))

    seq = seq_with_blocks("d", tokens, table_d)
    decode_runner.execute(SchedulerOutput([seq], [1], is_prefill=True))
    for pos in range(1, n):
        seq.num_computed_tokens = pos
        decode_runner.execute(SchedulerOutput([seq], [1], is_prefill=False))

    kv_p = prefill_runner.kv_cache[:, :, table_p].flatten(2, 3)[:, :, :n]
    kv_d = decode_runner.kv_cache[:, :, table_d].flatten(2, 3)[:, :, :n]
    assert kv_p.abs().max().item() > 0.1
    assert max_diff(kv_p, kv_d) < ATOL
    # Slots past the context stay untouched.
    assert decode_runner.kv_cache[:, :, table_d[-1], n - 2 * BLOCK_SIZE :].abs().max() == 0


def test_two_chunk_prefill_matches_hf(ours, hf_logits, ids) -> None:
    """A cached prefix then the rest: the `n != ctx` masked path (and the `n == 1` path)."""
    runner = _runner(ours)
    first = BLOCK_SIZE + 1  # the first chunk ends inside A's second block
    a = seq_with_blocks("a", ids["a"], [3, 11, 0])
    nb = len(ids["b"])
    b = seq_with_blocks("b", ids["b"], [6, 8])
    runner.execute(SchedulerOutput([a, b], [first, nb - 1], is_prefill=True))
    a.num_computed_tokens, b.num_computed_tokens = first, nb - 1

    rest = len(ids["a"]) - first
    batch = SchedulerOutput([a, b], [rest, 1], is_prefill=True)
    _, _, meta = runner._prepare(batch)
    assert meta.query_lens == [rest, 1]
    assert meta.context_lens_list == [len(ids["a"]), nb]
    assert not meta.all_decode

    logits = all_logits(runner, batch)
    assert max_diff(logits[:rest], hf_logits["a"][first:]) < ATOL
    assert max_diff(logits[rest], hf_logits["b"][-1]) < ATOL
