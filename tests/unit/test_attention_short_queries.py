"""The batched path for a few query tokens per sequence (speculative verification) gives the
same attention as one causal attention call per sequence."""

from __future__ import annotations

import pytest
import torch

from serving.models import attention
from serving.models.attention import paged_attention, write_kv
from serving.spec.forward import make_metadata

NUM_BLOCKS, BLOCK, HKV, HQ, D = 128, 16, 3, 9, 64


def _case(contexts: list[int], queries: list[int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    cache = torch.randn((2, NUM_BLOCKS, BLOCK, HKV, D), generator=gen)
    tables, next_block = [], 0
    for ctx in contexts:
        n = -(-ctx // BLOCK)
        tables.append(list(range(next_block, next_block + n))[::-1])  # not in order
        next_block += n
    starts = [ctx - n for ctx, n in zip(contexts, queries, strict=True)]
    _, meta = make_metadata(tables, starts, queries, BLOCK)
    num_tokens = sum(queries)
    q = torch.randn((num_tokens, HQ, D), generator=gen)
    k = torch.randn((num_tokens, HKV, D), generator=gen)
    v = torch.randn((num_tokens, HKV, D), generator=gen)
    write_kv(cache, k, v, meta.slot_mapping)
    return q, k, v, cache, meta


@pytest.mark.parametrize(
    ("contexts", "queries"),
    [([40], [5]), ([17, 90, 33], [1, 4, 2]), ([200, 16, 65, 31], [3, 3, 1, 5])],
)
def test_short_queries_match_per_sequence_attention(contexts, queries, monkeypatch) -> None:
    q, k, v, cache, meta = _case(contexts, queries)
    through_kernel = paged_attention(q, k, v, cache, meta, 0.125)
    assert meta.token_rows is not None, "the C++ decode kernel did not take the query tokens"
    q, k, v, cache, meta = _case(contexts, queries)
    monkeypatch.setattr(attention, "kernel_supports", lambda q, cache: False)
    batched = paged_attention(q, k, v, cache, meta, 0.125)
    assert meta.short_queries is not None  # the batched path ran
    _, _, _, _, meta_loop = _case(contexts, queries)
    monkeypatch.setattr(attention, "MAX_SHORT_QUERY", 0)
    per_sequence = paged_attention(q, k, v, cache, meta_loop, 0.125)
    assert meta_loop.short_queries is None
    torch.testing.assert_close(batched, per_sequence, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(through_kernel, per_sequence, atol=1e-5, rtol=1e-5)


def test_short_queries_through_the_kernel_in_bf16() -> None:
    q, k, v, cache, meta = _case([200, 16, 65, 31], [3, 3, 1, 5])
    cache = cache.to(torch.bfloat16)
    fp32 = paged_attention(q, k, v, cache.float(), meta, 0.125)
    meta.token_rows = None
    bf16 = paged_attention(q.to(torch.bfloat16), k, v, cache, meta, 0.125)
    assert meta.token_rows is not None
    torch.testing.assert_close(bf16.float(), fp32, atol=2e-2, rtol=2e-2)


def test_a_prompt_without_cached_prefix_takes_the_per_sequence_path() -> None:
    q, k, v, cache, meta = _case([20, 6], [4, 6])  # the second has nothing cached
    paged_attention(q, k, v, cache, meta, 0.125)
    assert meta.short_queries is None


@pytest.mark.parametrize("contexts", [[20], [200] * 8])  # SDPA and the written-out path
def test_decode_reports_attention_mass_only_when_asked(contexts) -> None:
    queries = [1] * len(contexts)
    q, k, v, cache, meta = _case(contexts, queries)
    paged_attention(q, k, v, cache, meta, 0.125)
    assert meta.importance is None  # else every step would count as staged KV
    q, k, v, cache, meta = _case(contexts, queries)
    meta.importance_layer = meta.layer
    paged_attention(q, k, v, cache, meta, 0.125)
    assert meta.importance is not None
    # every query's probabilities sum to 1 over its context, summed over the 9 heads
    torch.testing.assert_close(meta.importance.sum(-1), torch.full((len(contexts),), 9.0))
