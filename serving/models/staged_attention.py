"""Decode attention over a context part of which is held quantized, without dequantizing it.

A quantized unit's keys are `codes * s + z` with one (s, z) per channel for the whole unit,
so a query's scores against it are `(q * s) @ codes^T + q @ z`: the scale folds into the
query (one small multiply) and the codes, exact small integers, go into the matmul as
they are. Values are `codes * s_t + z_t` with one (s_t, z_t) per token (and head), so the
unit's share of the output is `(p * s_t) @ codes + p @ z_t`. The full-size elementwise
passes of a dequantization are gone; what remains is converting codes to floats.

Each row's L0 blocks and units come padded (`CompactPlan`): holes are never gathered.
Scores of the L0 part and of every pool's units are concatenated and softmaxed together.
Equal to attention over the dequantized values up to float rounding (tested against it).
With `alibi` (slopes, query positions), ALiBi biases from each key's logical position.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from serving.engine.staged_kv import StagedPlan

WORK = torch.float32  # scores, probabilities and code arithmetic


def _codes_bhtd(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 `[n, T, H, D * bits / 8]` → float `[n, H, T, D]`: each code plane is shifted
    out with a scalar shift and written straight to its interleaved place (no unpacked
    uint8 copy in between)."""
    n, t, h, m = packed.shape
    per_byte = 8 // bits
    out = torch.empty(n, h, t, m, per_byte, dtype=WORK)
    src = packed.permute(0, 2, 1, 3)  # [n, H, T, m]
    if bits == 8:
        out[..., 0].copy_(src)
    else:
        mask = (1 << bits) - 1
        for i in range(per_byte):
            out[..., i].copy_((src >> (bits * i)) & mask)
    return out.view(n, h, t, m * per_byte)


def staged_decode_attention(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    plan: StagedPlan,
    layer: int,
    scale: float,
    want_mass: bool,
    alibi: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`q [B, Hq, D]` → (`[B, Hq, D]`, attention mass per logical block `[B, columns]` or
    None). `layer_cache [2, num_blocks, bs, Hkv, D]`; `alibi`: fp32 slopes `[Hq]` and each
    row's query position `[B]`."""
    from serving.models.attention import gather_blocks

    compact = plan.compact
    assert compact is not None
    batch, num_heads, head_dim = q.shape
    _, _, bs, heads, _ = layer_cache.shape
    group = num_heads // heads
    qg = q.view(batch, heads, group, head_dim).to(WORK)  # [B, Hkv, G, D]

    kv0 = gather_blocks(layer_cache, compact.l0_tables)  # [2, B, N0*bs, Hkv, D]
    k0 = kv0[0].transpose(1, 2).to(WORK)  # [B, Hkv, L0, D]
    v0 = kv0[1].transpose(1, 2).to(WORK)
    scores = [torch.matmul(qg, k0.transpose(-1, -2)) * scale]  # [B, Hkv, G, L0]
    if alibi is not None:
        key_pos = (compact.l0_logical[:, :, None] * bs + torch.arange(bs)).flatten(1)  # [B, L0]
        scores[0] += _alibi(alibi, key_pos, heads, group)
    valid = [compact.l0_valid]
    units = []
    for key, cu in compact.units.items():
        pool = plan.pools[key]
        um = cu.slots.shape[1]
        f = pool.layer_fields(cu.slots.flatten(), layer)  # [B*U, ...] per field
        t = f["k_codes"].shape[1]
        k_codes = _codes_bhtd(f["k_codes"], pool.bits)  # [B*U, Hkv, T, D]
        q_u = qg.repeat_interleave(um, dim=0)  # [B*U, Hkv, G, D]
        k_scale = f["k_scale"][:, 0].to(WORK).unsqueeze(2)  # [B*U, Hkv, 1, D]
        k_zero = f["k_zero"][:, 0].to(WORK).unsqueeze(2)
        s_u = torch.matmul(q_u * k_scale, k_codes.transpose(-1, -2))  # [B*U, Hkv, G, T]
        s_u = (s_u + (q_u * k_zero).sum(-1, keepdim=True)) * scale
        s_u = s_u.view(batch, um, heads, group, t).permute(0, 2, 3, 1, 4)  # [B, H, G, U, T]
        s_u = s_u.reshape(batch, heads, group, um * t)
        if alibi is not None:
            key_pos = (cu.first_block[:, :, None] * bs + torch.arange(t)).flatten(1)  # [B, U*T]
            s_u = s_u + _alibi(alibi, key_pos, heads, group)
        scores.append(s_u)
        valid.append(cu.valid[:, :, None].expand(batch, um, t).reshape(batch, um * t))
        units.append((key, cu, f, um, t))
    all_scores = torch.cat(scores, dim=-1)
    mask = torch.cat(valid, dim=-1)  # [B, L]
    probs = all_scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(dim=-1)
    l0_len = k0.shape[2]
    out = torch.matmul(probs[..., :l0_len], v0)  # [B, Hkv, G, D]
    offset = l0_len
    for key, _cu, f, um, t in units:
        pool = plan.pools[key]
        p_u = probs[..., offset : offset + um * t].reshape(batch, heads, group, um, t)
        p_u = p_u.permute(0, 3, 1, 2, 4).reshape(batch * um, heads, group, t)
        v_codes = _codes_bhtd(f["v_codes"], pool.v_bits)  # [B*U, Hkv, T, D]
        # per-token (and per-head, or shared by all heads) value scale and zero
        v_scale = f["v_scale"][..., 0].to(WORK).transpose(1, 2)[:, :, None, :]  # [B*U, H|1, 1, T]
        v_zero = f["v_zero"][..., 0].to(WORK).transpose(1, 2)[:, :, None, :]
        o_u = torch.matmul(p_u * v_scale, v_codes)  # [B*U, Hkv, G, D]
        o_u = o_u + (p_u * v_zero).sum(-1, keepdim=True)
        out += o_u.view(batch, um, heads, group, head_dim).sum(dim=1)
        offset += um * t
    mass = _block_mass(probs, compact, units, bs) if want_mass else None
    return out.reshape(batch, num_heads, head_dim).to(q.dtype), mass


def _alibi(
    alibi: tuple[torch.Tensor, torch.Tensor], key_pos: torch.Tensor, heads: int, group: int
) -> torch.Tensor:
    """`[B, Hkv, G, L]` biases for keys at `key_pos [B, L]`."""
    slopes, query_pos = alibi
    distance = (key_pos - query_pos[:, None]).to(WORK)  # [B, L]
    return slopes.view(1, heads, group, 1) * distance[:, None, None, :]


def _block_mass(probs: torch.Tensor, compact, units, bs: int) -> torch.Tensor:
    """Attention mass per logical block `[B, columns]` (a unit's goes to its first block)."""
    per_token = probs.sum(dim=(1, 2))  # [B, L]
    batch = per_token.shape[0]
    mass = torch.zeros(batch, compact.num_block_columns, dtype=per_token.dtype)
    n0 = compact.l0_tables.shape[1]
    mass.scatter_add_(1, compact.l0_logical, per_token[:, : n0 * bs].view(batch, n0, bs).sum(-1))
    offset = n0 * bs
    for _key, cu, _f, um, t in units:
        unit_mass = per_token[:, offset : offset + um * t].view(batch, um, t).sum(-1)
        mass.scatter_add_(1, cu.first_block, unit_mass)
        offset += um * t
    return mass
