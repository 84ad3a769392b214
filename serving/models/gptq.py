"""GPTQ (Frantar et al., 2022) for `model.weights: int4`: round each weight column in turn and
push its rounding error onto the columns not yet rounded, in proportion to how the
calibration inputs correlate them, so that the layer's *outputs* on those inputs move as
little as possible, rather than each weight on its own (round-to-nearest).

Why: round-to-nearest int4 in groups of 32 costs this 135M model +25 % perplexity on weights
off a 4-bit grid (benchmarks/results/2026-12-05/weights); the error each rounding makes is
mostly cancelable by its neighbours, which GPTQ does with one Cholesky factor per layer.

Pure tensor functions, in the group layout `weight_quant.quantize_int4_groups` writes for
torch's int4 kernel: each group's scale and zero are chosen (min-max, bf16) when the sweep
reaches the group, from its columns as the earlier errors have updated them.
"""

from __future__ import annotations

import torch

from serving.models.weight_quant import bf16_at_least, int4_group_params

# Fraction of the mean Hessian diagonal added to it: keeps the Cholesky factor stable where
# calibration inputs are (nearly) collinear; 0.01 is the paper's default.
DAMP = 0.01
# Columns swept between two lazy updates of the rest of the matrix (the paper's B).
BLOCK = 128
# Range shrink factors tried for act order's static groups. Measured on SmolLM2 off the
# GGUF grid (benchmarks/results/2026-12-06/int4-gptq): the least-squares range gave 21.61
# against min-max's 21.70 ppl with qkv at int8 (the product's mix), 22.72 against 22.63
# with every layer int4: about a wash, kept for the mix it measured better on.
SHRINKS = torch.arange(0.70, 1.0001, 0.02).tolist()


def mse_group_params(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`int4_group_params`' `(scale, zero)` for the range, shrunk about its centre by the
    factor in `SHRINKS`, that rounds each group (last dim) with the least squared error."""
    lo, hi = groups.amin(-1), groups.amax(-1)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    best_err = torch.full_like(lo, float("inf"))
    best_scale, best_zero = torch.zeros_like(lo), torch.zeros_like(lo)
    for shrink in SHRINKS:
        scale = bf16_at_least(2 * shrink * half / 15).float()
        zero = (mid - shrink * half + 8 * scale).to(torch.bfloat16).float()
        codes = torch.round((groups - zero[..., None]) / scale.clamp(min=1e-30)[..., None] + 8)
        deq = (codes.clamp(0, 15) - 8) * scale[..., None] + zero[..., None]
        err = (deq - groups).pow(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def gptq_int4(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    damp: float = DAMP,
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(q [N, K] int32 in 0..15, scales_and_zeros [K/g, N, 2] bf16)`, as
    `quantize_int4_groups` returns, for `weight [N, K]` and the inputs' second moment
    `hessian [K, K]` (sum of x x^T over calibration tokens).

    `act_order`: sweep the columns by decreasing input energy (the Hessian's diagonal), so
    the inputs that matter most are rounded first, while the most columns remain to absorb
    their errors; each group's scale and zero are then fixed up front from the weights as
    given (the kernel's groups stay contiguous), as AutoGPTQ's `static_groups` does, each
    group's range chosen for the least squared error (`mse_group_params`)."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
    w = weight.detach().float().clone()
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0  # an input never seen: its weights cannot matter, zero them
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    groups = k // group_size
    if act_order:
        scales, zeros = mse_group_params(w.view(n, groups, group_size))
        order = torch.argsort(torch.diag(h), descending=True)
    else:
        scales, zeros = torch.zeros(n, groups), torch.zeros(n, groups)
        order = torch.arange(k)
    w, h = w[:, order], h[order][:, order]
    group_of = order // group_size  # the (natural) group of each swept column
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    # the upper Cholesky factor of H^-1: row i holds how column i's error spreads onward
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    hinv = hinv.float()
    q = torch.zeros(n, k, dtype=torch.int32)
    for b0 in range(0, k, BLOCK):
        b1 = min(k, b0 + BLOCK)
        block = w[:, b0:b1]  # a view: updated in place
        errors = torch.zeros(n, b1 - b0)
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            g = int(group_of[col])
            if not act_order and col % group_size == 0:
                scales[:, g], zeros[:, g] = int4_group_params(w[:, col : col + group_size])
            scale, zero = scales[:, g], zeros[:, g]
            codes = torch.round((block[:, i] - zero) / scale.clamp(min=1e-30) + 8).clamp(0, 15)
            q[:, col] = codes.to(torch.int32)
            err = (block[:, i] - ((codes - 8) * scale + zero)) / hb[i, i]
            block[:, i:] -= err[:, None] * hb[i, i:][None, :]
            errors[:, i] = err
        w[:, b1:] -= errors @ hinv[b0:b1, b1:]
    q = q[:, torch.argsort(order)]  # back to the weight's column order
    sz = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # [K/g, N, 2]
    return q, sz.to(torch.bfloat16)
