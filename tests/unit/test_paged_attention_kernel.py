"""The C++ paged decode-attention kernel (`serving.kernels.paged_attention`) gives the same
attention as a plain per-sequence softmax and as `_decode_attention`'s torch path, reading
K/V through random, non-contiguous block tables over contexts that cross block boundaries.

The kernel must build wherever g++ is (every machine this project runs on): a failed build
fails these tests rather than skipping them.
"""

from __future__ import annotations

import pytest
import torch

from serving.kernels.paged_attention import kernel_available, paged_decode_attention
from serving.models import attention
from serving.models.attention import paged_attention, write_kv
from serving.spec.forward import make_metadata

BLOCK, HKV, D = 16, 3, 64
CONTEXTS = [1, 15, 16, 17, 100, 300, 33, 2, 255, 64, 129, 31]
SCALE = D**-0.5
# A bf16 output is the fp32 result rounded once: at most half an ulp, 2^-8 of its magnitude
# (7 stored mantissa bits), plus fp32 summation error far below that (atol).
BF16_RTOL, BF16_ATOL = 2**-8, 1e-5


@pytest.fixture(scope="module", autouse=True)
def _kernel_built() -> None:
    assert kernel_available(), "the paged attention kernel did not build (see the warning)"


def _case(contexts: list[int], group: int, dtype: torch.dtype, seed: int = 0, head_dim: int = D):
    """(q, cache, meta) with each sequence's blocks drawn at random from a shuffled pool, so
    tables are neither in order nor contiguous, and its newest token written last."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [-(-ctx // BLOCK) for ctx in contexts]
    num_blocks = sum(blocks) + 8
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for n in blocks:
        tables.append(pool[used : used + n])
        used += n
    cache = torch.randn((2, num_blocks, BLOCK, HKV, head_dim), generator=gen).to(dtype)
    _, meta = make_metadata(tables, [ctx - 1 for ctx in contexts], [1] * len(contexts), BLOCK)
    q = torch.randn((len(contexts), HKV * group, head_dim), generator=gen).to(dtype)
    k = torch.randn((len(contexts), HKV, head_dim), generator=gen).to(dtype)
    v = torch.randn((len(contexts), HKV, head_dim), generator=gen).to(dtype)
    write_kv(cache, k, v, meta.slot_mapping)
    return q, cache, meta


def _reference(q: torch.Tensor, cache: torch.Tensor, meta, scale: float = SCALE) -> torch.Tensor:
    """Per sequence and head, softmax(q k^T * scale) v in fp64 over its context."""
    num_heads, head_dim = q.shape[1:]
    group = num_heads // cache.shape[3]
    flat = cache.double().reshape(2, -1, cache.shape[3], head_dim)
    out = []
    for i, ctx in enumerate(meta.context_lens_list):
        pos = torch.arange(ctx)
        slots = meta.block_tables[i, pos // BLOCK] * BLOCK + pos % BLOCK
        k = flat[0, slots].repeat_interleave(group, dim=1)  # [ctx, Hq, D]
        v = flat[1, slots].repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,thd->ht", q[i].double(), k) * scale
        out.append(torch.einsum("ht,thd->hd", scores.softmax(-1), v))
    return torch.stack(out)


def _batches() -> list[list[int]]:
    singles = [[ctx] for ctx in (1, 15, 16, 17, 100, 300)]
    return [*singles, [17, 1, 300], [100, 16, 15], (CONTEXTS * 3)[:32]]


@pytest.mark.parametrize("contexts", _batches(), ids=lambda c: f"{len(c)}x{max(c)}")
@pytest.mark.parametrize("group", [1, 3])
def test_kernel_matches_reference_fp32(contexts, group) -> None:
    q, cache, meta = _case(contexts, group, torch.float32)
    out = paged_decode_attention(q, cache, meta.block_tables, meta.context_lens, SCALE)
    assert out.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out.double(), _reference(q, cache, meta), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("contexts", _batches(), ids=lambda c: f"{len(c)}x{max(c)}")
@pytest.mark.parametrize("group", [1, 3])
def test_kernel_matches_reference_bf16(contexts, group) -> None:
    q, cache, meta = _case(contexts, group, torch.bfloat16)
    out = paged_decode_attention(q, cache, meta.block_tables, meta.context_lens, SCALE)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.double(), _reference(q, cache, meta), atol=BF16_ATOL, rtol=BF16_RTOL
    )


@pytest.mark.parametrize(
    ("head_dim", "group"),
    [(128, 3), (128, 1), (48, 3), (64, 5)],  # the other vectorised size; plain-loop cases
)
def test_kernel_other_head_dims_and_groups(head_dim, group) -> None:
    q, cache, meta = _case([17, 300, 1], group, torch.float32, head_dim=head_dim)
    scale = head_dim**-0.5
    out = paged_decode_attention(q, cache, meta.block_tables, meta.context_lens, scale)
    torch.testing.assert_close(
        out.double(), _reference(q, cache, meta, scale), atol=1e-4, rtol=1e-4
    )


def _without_kernel(monkeypatch) -> None:
    monkeypatch.setattr(attention, "kernel_supports", lambda q, cache: False)


@pytest.mark.parametrize("contexts", _batches(), ids=lambda c: f"{len(c)}x{max(c)}")
def test_decode_attention_same_with_and_without_kernel_fp32(contexts, monkeypatch) -> None:
    q, cache, meta = _case(contexts, 3, torch.float32)
    with_kernel = attention._decode_attention(q, cache, meta, SCALE)
    _without_kernel(monkeypatch)
    torch_path = attention._decode_attention(q, cache, meta, SCALE)
    torch.testing.assert_close(with_kernel, torch_path, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("contexts", [[300], [17, 1, 300], (CONTEXTS * 3)[:32]])
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32])
def test_decode_attention_bf16_cache_no_worse_than_torch_path(
    contexts, q_dtype, monkeypatch
) -> None:
    """With a bf16 cache the torch path rounds scores and probabilities to bf16 before the
    value matmul, so the two paths differ by that rounding; the kernel (fp32 throughout)
    must be at least as close to the exact result, and close to the torch path."""
    q, cache, meta = _case(contexts, 3, torch.bfloat16)
    q = q.to(q_dtype)
    exact = _reference(q, cache, meta)
    with_kernel = attention._decode_attention(q, cache, meta, SCALE)
    _without_kernel(monkeypatch)
    torch_path = attention._decode_attention(q, cache, meta, SCALE)
    assert with_kernel.dtype == torch_path.dtype == q_dtype
    kernel_err = (with_kernel.double() - exact).abs().max()
    torch_err = (torch_path.double() - exact).abs().max()
    assert kernel_err <= torch_err
    torch.testing.assert_close(with_kernel, torch_path, atol=2 * float(torch_err), rtol=0)


def test_mixed_step_decode_rows_use_the_kernel(monkeypatch) -> None:
    """A chunked-prefill step's decode rows go through `_decode_attention`, hence the kernel;
    the result equals the torch path's."""
    gen = torch.Generator().manual_seed(3)
    contexts, queries = [40, 120, 17], [1, 24, 1]  # decode, prompt chunk, decode
    tables = [[5, 2, 9], [0, 7, 1, 3, 8, 11, 4, 12], [6, 10]]
    cache = torch.randn((2, 16, BLOCK, HKV, D), generator=gen)
    starts = [c - n for c, n in zip(contexts, queries, strict=True)]
    _, meta = make_metadata(tables, starts, queries, BLOCK)
    q = torch.randn((sum(queries), HKV * 3, D), generator=gen)
    k = torch.randn((sum(queries), HKV, D), generator=gen)
    v = torch.randn((sum(queries), HKV, D), generator=gen)
    write_kv(cache, k, v, meta.slot_mapping)
    calls = []
    real = attention.paged_decode_attention
    monkeypatch.setattr(
        attention, "paged_decode_attention", lambda *a: calls.append(a[0].shape) or real(*a)
    )
    with_kernel = paged_attention(q, k, v, cache, meta, SCALE)
    assert calls == [torch.Size([2, HKV * 3, D])]  # the two decode rows, one call
    _, meta2 = make_metadata(tables, starts, queries, BLOCK)
    _without_kernel(monkeypatch)
    torch_path = paged_attention(q, k, v, cache, meta2, SCALE)
    torch.testing.assert_close(with_kernel, torch_path, atol=1e-4, rtol=1e-4)


def test_attention_mass_steps_keep_the_torch_path(monkeypatch) -> None:
    q, cache, meta = _case([200] * 4, 3, torch.float32)
    monkeypatch.setattr(attention, "paged_decode_attention", None)  # would raise if called
    meta.layer = meta.importance_layer = 0
    attention._decode_attention(q, cache, meta, SCALE)
    assert meta.importance is not None and meta.importance.shape == (4, 13)


def test_kernel_rejects_block_ids_outside_the_cache() -> None:
    q, cache, meta = _case([40], 1, torch.float32)
    tables = meta.block_tables.clone()
    tables[0, 1] = cache.shape[1]
    with pytest.raises(RuntimeError, match="out of range"):
        paged_decode_attention(q, cache, tables, meta.context_lens, SCALE)


def test_registered_as_a_torch_op_with_a_meta_kernel() -> None:
    q, cache, meta = _case([17, 33], 3, torch.float32)
    out = torch.ops.inferos.paged_decode_attention(
        q.to("meta"),
        cache.to("meta"),
        meta.block_tables.to("meta"),
        meta.context_lens.to("meta"),
        SCALE,
    )
    assert out.device.type == "meta" and out.shape == q.shape


def test_shares_the_inferos_namespace_with_the_other_kernels() -> None:
    """Each kernel is its own .so adding ops to `torch.ops.inferos` (library fragments): all
    of them load into one process."""
    from serving.kernels import q8_linear

    assert q8_linear.kernel_available()
    q, cache, meta = _case([17, 33], 3, torch.float32)
    out = paged_decode_attention(q, cache, meta.block_tables, meta.context_lens, SCALE)
    torch.testing.assert_close(out.double(), _reference(q, cache, meta), atol=1e-4, rtol=1e-4)


# --- staged contexts: L0 blocks plus INT8/INT4 units (staged_decode_attention's semantics) ---

UNIT_BLOCKS = 2  # blocks per quantized unit


def _staged_case(contexts: list[int], units: list[list[int]], dtype: torch.dtype, pools):
    """(q, cache, plan, layer): sequence i's logical units `units[i]` (of UNIT_BLOCKS blocks)
    held quantized, spread round-robin over `pools` ((key, bits, value_bits, value_group));
    the rest of its context in shuffled L0 blocks. Quantized from values of 2 layers, read at
    layer 1."""
    from serving.engine.staged_kv import CompactPlan, CompactUnits, StagedPlan
    from serving.kv.quant import quantize_block
    from serving.kv.quant_pool import QuantPool

    gen = torch.Generator().manual_seed(len(contexts))
    layer, tokens = 1, UNIT_BLOCKS * BLOCK
    blocks = [-(-ctx // BLOCK) for ctx in contexts]
    num_blocks = sum(blocks) + 4
    cache = torch.randn((2, num_blocks, BLOCK, HKV, D), generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    quant = {key: QuantPool() for key, *_ in pools}
    held: dict = {key: [[] for _ in contexts] for key, *_ in pools}
    l0: list[list[tuple[int, int]]] = []
    n = 0
    for row, nb in enumerate(blocks):
        l0.append([])
        for i, u in enumerate(units[row]):
            key, bits, v_bits, group = pools[i % len(pools)]
            values = torch.randn((2, 2, tokens, HKV, D), generator=gen).to(dtype)  # [L, 2, T..]
            slot = quant[key].put(quantize_block(values, bits, group, v_bits))
            held[key][row].append((u * UNIT_BLOCKS, slot))
        quantized = {u * UNIT_BLOCKS + j for u in units[row] for j in range(UNIT_BLOCKS)}
        for b in range(nb):
            if b not in quantized:
                l0[row].append((b, order[n]))
                n += 1
    n0 = max(1, max(len(x) for x in l0))
    dummy = max(blocks)  # the importance column padding points at
    l0_tables = torch.zeros(len(contexts), n0, dtype=torch.long)
    l0_logical = torch.full((len(contexts), n0), dummy, dtype=torch.long)
    l0_valid = torch.zeros(len(contexts), n0 * BLOCK, dtype=torch.bool)
    for r, (row_blocks, ctx) in enumerate(zip(l0, contexts, strict=True)):
        if row_blocks:
            logical = torch.tensor([i for i, _ in row_blocks])
            l0_tables[r, : len(row_blocks)] = torch.tensor([b for _, b in row_blocks])
            l0_logical[r, : len(row_blocks)] = logical
            positions = logical[:, None] * BLOCK + torch.arange(BLOCK)[None, :]
            l0_valid[r, : len(row_blocks) * BLOCK] = (positions < ctx).flatten()
    compact_units = {}
    for key, per_row in held.items():
        um = max(len(x) for x in per_row)
        if um:
            slots = torch.zeros(len(contexts), um, dtype=torch.long)
            first = torch.full((len(contexts), um), dummy, dtype=torch.long)
            valid = torch.zeros(len(contexts), um, dtype=torch.bool)
            for r, row_units in enumerate(per_row):
                for j, (first_block, slot) in enumerate(row_units):
                    slots[r, j], first[r, j], valid[r, j] = slot, first_block, True
            compact_units[key] = CompactUnits(slots, first, valid)
    compact = CompactPlan(l0_tables, l0_logical, l0_valid, compact_units, dummy + 1)
    plan = StagedPlan(quant, {}, {}, {}, tokens, compact=compact)
    q = torch.randn((len(contexts), HKV * 3, D), generator=gen).to(dtype)
    return q, cache, plan, layer


def _pools(kind: str):
    from policies.kv_levels import Level

    return {
        "int8": [((Level.L1, 8), 8, 8, "token")],
        "int4": [((Level.L2, 4), 4, 4, "head")],
        "both": [((Level.L1, 8), 8, 8, "token"), ((Level.L2, 4), 4, 4, "head")],
        "int4-k-int2-v": [((Level.L2, 2), 4, 2, "head")],
    }[kind]


STAGED_CASES = [
    ([100], [[1, 2]]),  # units in the middle, L0 sink and recent blocks around them
    ([300, 40, 17], [[0, 3, 5], [], [0]]),  # a row without units; a row that is mostly units
    ([129, 65, 200, 33], [[1], [0, 1], [2, 4], [0]]),
]


@pytest.mark.parametrize("kind", ["int8", "int4", "both", "int4-k-int2-v"])
@pytest.mark.parametrize(("contexts", "units"), STAGED_CASES, ids=["1", "3", "4"])
def test_staged_kernel_matches_staged_decode_attention(contexts, units, kind) -> None:
    from serving.kernels.paged_attention import paged_decode_attention_staged
    from serving.models.staged_attention import staged_decode_attention

    q, cache, plan, layer = _staged_case(contexts, units, torch.float32, _pools(kind))
    out = paged_decode_attention_staged(q, cache, plan, layer, SCALE)
    want, _ = staged_decode_attention(q, cache, plan, layer, SCALE, False)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def test_staged_kernel_bf16_within_one_rounding(monkeypatch) -> None:
    """bf16 q and cache: the torch path computes in fp32 too (its WORK dtype), so the two
    differ by the final rounding to bf16 of outputs that agree to ~1e-6: one bf16 ulp."""
    from serving.kernels.paged_attention import paged_decode_attention_staged
    from serving.models.staged_attention import staged_decode_attention

    q, cache, plan, layer = _staged_case(*STAGED_CASES[1], torch.bfloat16, _pools("both"))
    out = paged_decode_attention_staged(q, cache, plan, layer, SCALE)
    want, _ = staged_decode_attention(q, cache, plan, layer, SCALE, False)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.float(), atol=1e-5, rtol=2**-7)


def test_decode_attention_takes_the_staged_kernel_unless_mass_is_wanted(monkeypatch) -> None:
    contexts, units = STAGED_CASES[2]
    q, cache, plan, layer = _staged_case(contexts, units, torch.float32, _pools("both"))
    tables = [[0] * -(-c // BLOCK) for c in contexts]  # unused: the plan says where K/V are
    _, meta = make_metadata(tables, [c - 1 for c in contexts], [1] * len(contexts), BLOCK)
    meta.staged, meta.layer = plan, layer
    calls = []
    real = attention.paged_decode_attention_staged
    monkeypatch.setattr(
        attention, "paged_decode_attention_staged", lambda *a: calls.append(1) or real(*a)
    )
    with_kernel = attention._decode_attention(q, cache, meta, SCALE)
    assert calls == [1]
    meta.importance_layer = layer  # a mass step: the torch path, which returns the mass
    with_mass = attention._decode_attention(q, cache, meta, SCALE)
    assert calls == [1] and meta.importance is not None
    torch.testing.assert_close(with_kernel, with_mass, atol=1e-4, rtol=1e-4)
