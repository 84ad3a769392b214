"""Paged attention over a block-structured KV cache, in plain torch (CPU or GPU).

The cache of one layer is `[2, num_blocks, block_size, num_kv_heads, head_dim]` (K then V).
Each sequence owns a block table: the ids of its blocks in order. New tokens' K/V are
written to their slots first, then queries attend to the whole context through the table,
so prefill, prefill-after-a-cached-prefix, decode and multi-token verification are one path.

ALiBi (BLOOM): with `alibi_slopes [num_heads]` every path adds `slope_h * (key_pos -
query_pos)` to head h's scores (0 at the query's own position, more negative with
distance), and decode steps take the torch path rather than the C++ kernels, which have
no bias. Without slopes (every rotary family) nothing of this runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from serving.kernels.paged_attention import (
    kernel_supports,
    paged_decode_attention,
    paged_decode_attention_staged,
)
from serving.models.staged_attention import staged_decode_attention

if TYPE_CHECKING:
    from serving.engine.staged_kv import StagedPlan


@dataclass(slots=True)
class AttentionMetadata:
    """What one forward pass needs to know about the layout of its tokens.

    Tokens of all sequences are flattened into one `[num_tokens]` batch, sequence after
    sequence; `query_lens[i]` of them belong to sequence i, whose context after this pass
    holds `context_lens[i]` tokens (cached prefix + these queries).
    """

    slot_mapping: torch.Tensor  # [num_tokens] flat slot (block_id * block_size + offset)
    block_tables: torch.Tensor  # [num_seqs, max_blocks] block ids, padded with 0
    context_lens: torch.Tensor  # [num_seqs]
    query_lens: list[int]
    context_lens_list: list[int]
    all_decode: bool  # every sequence has exactly one query token
    # Staged KV: where this step's quantized units go in the gathered context (None: none).
    staged: StagedPlan | None = None
    layer: int = 0  # set by the model before each layer
    # Decode steps where importance is sampled: the attention probabilities of this layer,
    # summed over heads and over each block's tokens, come back in `importance` as
    # `[num_seqs, blocks]` (logical block order; extra columns are padding).
    importance_layer: int = -1
    importance: torch.Tensor | None = None
    # Short multi-token queries over cached contexts (speculative verification), built once
    # per forward pass by the first layer that needs them and reused by the others.
    short_queries: ShortQueries | None = None
    # A chunked-prefill step's split into decode rows and prompt chunks, built likewise.
    mixed: MixedRows | None = None
    # Short queries through the decode kernel: each query token's block table and visible
    # context length, built likewise.
    token_rows: tuple[torch.Tensor, torch.Tensor] | None = None
    # Causal masks of prompt chunks after a cached prefix, by (queries, context), built
    # likewise: building one costs a third of the attention call it masks.
    chunk_masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


def write_kv(
    layer_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter new keys/values `[num_tokens, num_kv_heads, head_dim]` into their slots."""
    _, num_blocks, block_size, num_kv_heads, head_dim = layer_cache.shape
    flat = layer_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, k.to(flat.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(flat.dtype))


def paged_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    layer_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of `q [num_tokens, num_heads, head_dim]` over each sequence's cached context.

    The new K/V must already be written to the cache (see `write_kv`); `k_new`/`v_new` are
    used directly where a sequence has no cached prefix, which saves a gather.
    `alibi_slopes` (fp32 `[num_heads]`): ALiBi biases on the scores.
    Returns `[num_tokens, num_heads, head_dim]`.
    """
    if meta.all_decode:
        return _decode_attention(q, layer_cache, meta, scale, alibi_slopes)
    if meta.staged is None and _short_queries_only(meta):
        return _short_query_attention(q, layer_cache, meta, scale, alibi_slopes)
    if meta.staged is None:
        if meta.mixed is None:
            meta.mixed = MixedRows.build(meta)
        if meta.mixed.decode is not None:
            return _mixed_attention(q, k_new, v_new, layer_cache, meta, scale, alibi_slopes)
    return _per_sequence_attention(q, k_new, v_new, layer_cache, meta, scale, alibi_slopes)


def alibi_bias(
    slopes: torch.Tensor, key_pos: torch.Tensor, query_pos: torch.Tensor
) -> torch.Tensor:
    """fp32 `slopes * (key_pos - query_pos)`; the caller shapes the three to broadcast."""
    return slopes * (key_pos - query_pos).float()


def _per_sequence_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    layer_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """One causal attention call per sequence (prompts, or prompt chunks after a cached or
    quantized prefix)."""
    outputs = []
    start = 0
    for i, n in enumerate(meta.query_lens):
        outputs.append(
            _row_attention(q, k_new, v_new, layer_cache, meta, scale, i, start, n, alibi_slopes)
        )
        start += n
    return torch.cat(outputs, dim=0)


def _row_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    layer_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    row: int,
    start: int,
    n: int,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row `row`'s `n` queries (flat tokens from `start`) causally over its context."""
    ctx = meta.context_lens_list[row]
    q_i = q[start : start + n]
    if n == ctx:  # nothing cached before these tokens: use them as they are
        k_i, v_i = k_new[start : start + n], v_new[start : start + n]
    else:
        plan = meta.staged.for_row(row) if meta.staged is not None else None
        k_i, v_i = _gather_context(layer_cache, meta.block_tables[row], ctx, plan, meta.layer)
    k_i, v_i = k_i.to(q.dtype), v_i.to(q.dtype)
    return _causal_attention(q_i, k_i, v_i, scale, alibi_slopes, meta.chunk_masks)


def _chunk_mask(
    masks: dict[tuple[int, int], torch.Tensor], n: int, ctx: int, like: torch.Tensor
) -> torch.Tensor:
    """`[n, ctx]` additive mask in `like`'s dtype (SDPA would convert a bool mask on every
    call): query j sits at position ctx - n + j and may see keys up to and including it.
    Built once per (n, ctx) in `masks`."""
    mask = masks.get((n, ctx))
    if mask is None:
        q_pos = torch.arange(ctx - n, ctx, device=like.device)[:, None]
        hidden = torch.arange(ctx, device=like.device)[None, :] > q_pos
        mask = torch.zeros((n, ctx), dtype=like.dtype, device=like.device)
        mask = masks[(n, ctx)] = mask.masked_fill_(hidden, float("-inf"))
    return mask


def gather_blocks(layer_cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """`[2, B, nb * block_size, Hkv, D]`: the blocks of each row of `block_tables [B, nb]`.

    `index_select` on a flat view: about twice as fast on CPU as advanced indexing."""
    two, num_blocks, block_size, num_kv_heads, head_dim = layer_cache.shape
    rows, nb = block_tables.shape
    flat = layer_cache.view(two, num_blocks, -1).index_select(1, block_tables.reshape(-1))
    return flat.view(two, rows, nb * block_size, num_kv_heads, head_dim)


def _gather_heads_first(
    layer_cache: torch.Tensor, block_tables: torch.Tensor, max_len: int
) -> torch.Tensor:
    """`[2, B, Hkv, max_len, D]`: every row's first `max_len` context tokens, heads first
    as the batched attention calls take them (rows shorter than max_len are masked)."""
    num_blocks = -(-max_len // layer_cache.shape[2])
    kv = gather_blocks(layer_cache, block_tables[:, :num_blocks])
    return kv[:, :, :max_len].transpose(2, 3)


def fill_staged(kv: torch.Tensor, plan: StagedPlan, layer: int) -> None:
    """Write this layer of the plan's quantized units, dequantized, into a gathered
    context `kv [2, B, tokens, Hkv, D]` (contiguous) in place: one vectorized dequantize
    and one `index_copy_` per level, whatever the number of units."""
    _, rows_total, tokens, num_kv_heads, head_dim = kv.shape
    flat = kv.view(2, rows_total * tokens, num_kv_heads, head_dim)
    steps = torch.arange(plan.unit_tokens)
    for level, slots in plan.slots.items():
        if not len(slots):
            continue
        k, v = plan.pools[level].dequantize_layer(slots, layer, kv.dtype)  # [n, T, H, D] each
        first = plan.rows[level] * tokens + plan.token_starts[level]  # [n]
        index = (first[:, None] + steps[None, :]).flatten()  # [n * T]
        flat[0].index_copy_(0, index, k.reshape(-1, num_kv_heads, head_dim))
        flat[1].index_copy_(0, index, v.reshape(-1, num_kv_heads, head_dim))


def _gather_context(
    layer_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
    plan: StagedPlan | None = None,
    layer: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    block_size = layer_cache.shape[2]
    num_blocks = -(-context_len // block_size)
    kv = gather_blocks(layer_cache, block_table[None, :num_blocks])
    if plan is not None:
        fill_staged(kv, plan, layer)
    kv = kv[:, 0, :context_len]
    return kv[0], kv[1]  # [ctx, Hkv, D] each


def _causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    masks: dict[tuple[int, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Queries are the last `len(q)` positions of a context of `len(k)` tokens (`masks`: the
    forward pass's causal masks, reused across layers)."""
    n, ctx = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if alibi_slopes is not None:
        q_pos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        bias = alibi_bias(alibi_slopes[:, None, None], k_pos, q_pos)  # [Hq, n, ctx]
        bias = bias.masked_fill_(k_pos > q_pos, float("-inf")).to(q.dtype)
        out = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=bias[None], scale=scale, enable_gqa=True
        )
    elif n == ctx:
        out = F.scaled_dot_product_attention(
            qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True
        )
    elif n == 1:
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale, enable_gqa=True)
    else:
        mask = _chunk_mask({} if masks is None else masks, n, ctx, q)
        out = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=True
        )
    return out[0].transpose(0, 1)  # [n, Hq, D]


# Up to this many query tokens per sequence (a verify pass: newest token + k drafts) go
# through one batched call instead of one attention call per sequence: on a small model the
# per-call overhead of 8 sequences x 30 layers costs more than the attention itself.
MAX_SHORT_QUERY = 16


def _short_queries_only(meta: AttentionMetadata) -> bool:
    return all(
        1 <= n <= MAX_SHORT_QUERY and n < ctx
        for n, ctx in zip(meta.query_lens, meta.context_lens_list, strict=True)
    )


@dataclass(slots=True)
class ShortQueries:
    """Where each query token sits in the padded `[B, Hkv, M * G, D]` layout, and the mask
    that lets query j of sequence i (at position ctx_i - n_i + j) see keys 0..that."""

    rows: torch.Tensor  # [num_tokens] flat index into B * M (padded query rows)
    mask: torch.Tensor  # [B, 1, M * G, L] bool
    max_query: int
    max_len: int
    last_visible: torch.Tensor  # [B, M] position of each (padded) query

    @staticmethod
    def build(meta: AttentionMetadata, group: int) -> ShortQueries:
        lens = torch.tensor(meta.query_lens)
        ctx = meta.context_lens
        num_seqs, m = len(meta.query_lens), int(lens.max())
        max_len = max(meta.context_lens_list)
        j = torch.arange(m)
        rows = (torch.arange(num_seqs)[:, None] * m + j[None, :])[j[None, :] < lens[:, None]]
        # a padded query row (j >= n_i) sees key 0 only, so its softmax stays finite
        last_visible = (ctx - lens)[:, None] + j[None, :]  # [B, M]
        last_visible = torch.where(j[None, :] < lens[:, None], last_visible, 0)
        keys = torch.arange(max_len)
        mask = keys[None, None, :] <= last_visible[:, :, None]  # [B, M, L]
        mask = mask.repeat_interleave(group, dim=1)[:, None]  # rows m * G + g
        return ShortQueries(rows, mask, m, max_len, last_visible)


def _short_query_attention(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """A few query tokens per sequence over its cached context, all sequences in one
    attention call (GQA as in `_decode_attention`: the G query heads of a KV head and the M
    query tokens are the M * G query rows of that head).

    Where the C++ decode kernel runs, each query token is one of its rows instead: query j
    of sequence i is a decode row over the first ctx_i - n_i + j + 1 tokens of i's blocks
    (the causal mask, as lengths), read in place. Measured at 32 streams with n-gram
    speculation, this path (gathering every context, then three torch ops) was a quarter of
    the engine's time."""
    want_mass = meta.layer == meta.importance_layer
    if not want_mass and alibi_slopes is None and kernel_supports(q, layer_cache):
        if meta.token_rows is None:
            meta.token_rows = _rows_per_query_token(meta)
        tables, lens = meta.token_rows
        return paged_decode_attention(q, layer_cache, tables, lens, scale)
    _, num_heads, head_dim = q.shape
    num_kv_heads = layer_cache.shape[3]
    group = num_heads // num_kv_heads
    sq = meta.short_queries
    if sq is None:
        sq = meta.short_queries = ShortQueries.build(meta, group)
    num_seqs, m = meta.num_seqs, sq.max_query
    kv = _gather_heads_first(layer_cache, meta.block_tables, sq.max_len)
    padded = q.new_zeros(num_seqs * m, num_heads, head_dim)
    padded.index_copy_(0, sq.rows, q)
    qg = (
        padded.view(num_seqs, m, num_kv_heads, group, head_dim)
        .permute(0, 2, 1, 3, 4)
        .reshape(num_seqs, num_kv_heads, m * group, head_dim)
        .to(kv.dtype)
    )
    bias = None
    if alibi_slopes is not None:  # rows m * G + g: query m of head kvh * G + g
        query_pos = sq.last_visible.repeat_interleave(group, dim=1)[:, None, :, None]
        slopes = alibi_slopes.view(num_kv_heads, 1, group).expand(-1, m, -1)
        slopes = slopes.reshape(1, num_kv_heads, m * group, 1)
        bias = alibi_bias(slopes, torch.arange(sq.max_len), query_pos)  # [B, Hkv, M*G, L]
    out, _ = masked_attention(qg, kv[0], kv[1], sq.mask, scale, bias=bias)
    out = (
        out.view(num_seqs, num_kv_heads, m, group, head_dim)
        .permute(0, 2, 1, 3, 4)
        .reshape(num_seqs * m, num_heads, head_dim)
    )
    return out.index_select(0, sq.rows).to(q.dtype)


def _rows_per_query_token(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query token: its sequence's block table and the context it may see (itself
    included), `([num_tokens, max_blocks], [num_tokens])` int64."""
    lens = torch.tensor(meta.query_lens)
    seq = torch.repeat_interleave(torch.arange(len(meta.query_lens)), lens)
    starts = torch.cumsum(lens, 0) - lens  # first flat token of each sequence
    j = torch.arange(int(lens.sum())) - starts[seq]
    visible = meta.context_lens.to(torch.int64)[seq] - lens[seq] + j + 1
    tables = meta.block_tables.to(torch.int64).index_select(0, seq).contiguous()
    return tables, visible


def _decode_attention(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per sequence: gather every sequence's blocks and attend in one batch.

    The `group` query heads sharing a KV head are laid out as `group` query rows of that
    head, so one SDPA call over `[num_seqs, num_kv_heads, group, head_dim]` does GQA
    without repeating K/V. With quantized units in the batch, `staged_attention` instead.
    Either way the C++ kernels (`serving.kernels.paged_attention`) where they run, unless
    this layer's attention mass is wanted.
    """
    want_mass = meta.layer == meta.importance_layer
    # the kernels add no ALiBi bias: such models take the torch paths
    use_kernel = not want_mass and alibi_slopes is None and kernel_supports(q, layer_cache)
    if meta.staged is not None and meta.staged.compact is not None:
        if use_kernel:
            return paged_decode_attention_staged(q, layer_cache, meta.staged, meta.layer, scale)
        alibi = None if alibi_slopes is None else (alibi_slopes, meta.context_lens - 1)
        out, mass = staged_decode_attention(
            q, layer_cache, meta.staged, meta.layer, scale, want_mass, alibi
        )
        if mass is not None:
            meta.importance = mass
        return out
    if use_kernel:  # K/V read in place, fp32 sums
        return paged_decode_attention(q, layer_cache, meta.block_tables, meta.context_lens, scale)
    num_seqs, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = layer_cache.shape
    group = num_heads // num_kv_heads
    max_len = int(meta.context_lens_list and max(meta.context_lens_list))
    num_blocks = -(-max_len // block_size)
    kv = _gather_heads_first(layer_cache, meta.block_tables, max_len)
    qg = q.view(num_seqs, num_kv_heads, group, head_dim).to(kv.dtype)
    keys = torch.arange(max_len, device=q.device)
    valid = keys[None, :] < meta.context_lens[:, None]
    mask = valid[:, None, None, :]
    bias = None
    if alibi_slopes is not None:  # [B, Hkv, G, L]; the query sits at context_len - 1
        query_pos = (meta.context_lens - 1)[:, None, None, None]
        bias = alibi_bias(alibi_slopes.view(1, num_kv_heads, group, 1), keys, query_pos)
    out, probs = masked_attention(qg, kv[0], kv[1], mask, scale, want_mass, bias)
    if probs is not None:
        per_token = probs.sum(dim=(1, 2))  # [B, L]
        padded = F.pad(per_token, (0, num_blocks * block_size - max_len))
        meta.importance = padded.view(num_seqs, num_blocks, block_size).sum(-1)
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


# Below this many (sequence, context token) pairs one SDPA call is cheaper than three ops.
SDPA_BELOW_KEYS = 512


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    want_probs: bool = False,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(output, fp32 probabilities if `want_probs`) of `q [B, H, R, D]` over
    `k, v [B, H, L, D]` where `mask` (broadcast to `[B, H, R, L]`) is True, `bias` (fp32,
    broadcast likewise; ALiBi) added to the scaled scores.

    Written out rather than SDPA: with a handful of query rows per head (decode, verify) the
    CPU SDPA kernel costs about twice these three small ops once there is some context
    (measured, bf16: 214 vs 111 us at batch 8 x 250 tokens, 108 vs 75 us at 1 x 1000), and
    the probabilities come for free for the attention mass. A single short sequence
    (1 x 250: 31 vs 51 us) stays on SDPA. Scores are the matmul in the cache's dtype,
    softmax in fp32, as transformers' eager attention does."""
    if not want_probs and q.shape[0] * k.shape[-2] < SDPA_BELOW_KEYS:
        if bias is not None:
            mask = bias.masked_fill(~mask, float("-inf")).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), None
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)
    if bias is not None:
        scores = scores + bias
    probs = scores.masked_fill_(~mask, float("-inf")).softmax(dim=-1)
    return torch.matmul(probs.to(v.dtype), v), probs if want_probs else None


@dataclass(slots=True)
class MixedRows:
    """A step of decode rows (one query token each) and prompt chunks: the decode rows'
    own metadata, so they attend in one batched call as in a pure decode step, and where
    their tokens sit in the flat batch. `decode` is None when the step has no decode row
    (or only decode rows: then `all_decode` already holds)."""

    decode: AttentionMetadata | None
    decode_tokens: torch.Tensor  # [num_decode_rows] flat token index of each decode row
    chunks: list[tuple[int, int, int, int]]  # (row, first flat token, query len, context)

    @staticmethod
    def build(meta: AttentionMetadata) -> MixedRows:
        decode_rows, decode_tokens, chunks = [], [], []
        start = 0
        for row, (n, ctx) in enumerate(zip(meta.query_lens, meta.context_lens_list, strict=True)):
            if n == 1:
                decode_rows.append(row)
                decode_tokens.append(start)
            else:
                chunks.append((row, start, n, ctx))
            start += n
        if not decode_rows or not chunks:
            return MixedRows(None, torch.empty(0, dtype=torch.long), chunks)
        index = torch.tensor(decode_rows)
        context_lens = [meta.context_lens_list[r] for r in decode_rows]
        decode = AttentionMetadata(
            slot_mapping=meta.slot_mapping[torch.tensor(decode_tokens)],
            block_tables=meta.block_tables.index_select(0, index),
            context_lens=meta.context_lens.index_select(0, index),
            query_lens=[1] * len(decode_rows),
            context_lens_list=context_lens,
            all_decode=True,
        )
        return MixedRows(decode, torch.tensor(decode_tokens), chunks)


def _mixed_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    layer_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode rows batched as in a decode step, each prompt chunk causally over its
    context: a chunk riding along costs its own attention, not one call per decode row."""
    mixed = meta.mixed
    assert mixed is not None and mixed.decode is not None
    out = torch.empty_like(q)
    decode = mixed.decode
    decode.layer = meta.layer
    out[mixed.decode_tokens] = _decode_attention(
        q.index_select(0, mixed.decode_tokens), layer_cache, decode, scale, alibi_slopes
    )
    for row, start, n, _ in mixed.chunks:
        out[start : start + n] = _row_attention(
            q, k_new, v_new, layer_cache, meta, scale, row, start, n, alibi_slopes
        )
    return out
