"""Write a twin of the default model whose linear layers hold int4 weights quantized off
the GGUF grid, for `inferos eval ppl --model TWIN --weights bf16`.

The default model's fp32 weights are dequantized Q4_1 (groups of 32 inputs on a 16-level
grid), so `model.weights: int4` with group 32 lands back on that grid. Here the same
quantizer (`serving.models.weight_quant.quantize_int4_groups`, group 32, bf16 scale and
zero) runs on groups shifted by OFFSET inputs (each row rolled by -OFFSET first and back
after): with OFFSET 16 every group spans halves of two Q4_1 blocks, so its min-max grid
coincides with neither and every weight is re-rounded. The dequantized weights are written
as fp32; the eval's 128-token steps run int4 layers dense on their dequantized weights
anyway, so `--weights bf16` on the twin computes what `--weights int4` would, except that
the head stays as it is (int4's int8 head costs +0.097 %, `ppl_int8_split.json`).
OFFSET 0 is the control: it must give int4's layers-only cost on the grid.

With a third argument `clip`, each group's min-max range is first shrunk about its centre
by the factor in 0.60..1.00 (step 0.025) that minimises the group's squared error (a
sketch of MSE clipping as llama.cpp's k-quants search it; not the product's quantizer).

usage: .venv/bin/python benchmarks/results/2026-12-05/weights/offset_int4_model.py OUT OFFSET [clip]
"""

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from serving.models.hf_folder import resolve_model_path
from serving.models.int4 import quantize_on_grid
from serving.models.weight_quant import dequantize_int4, quantize_int4_groups

GROUP = 32
out, offset = Path(sys.argv[1]), int(sys.argv[2])
clip = sys.argv[3:] == ["clip"]


def fake_int4_clipped(w: torch.Tensor) -> torch.Tensor:
    """Min-max int4 per group of 32 on a range shrunk by the per-group best factor."""
    n, k = w.shape
    g = w.float().view(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    best, best_err = g.clone(), torch.full_like(lo, float("inf"))
    for alpha in torch.arange(0.60, 1.0001, 0.025).tolist():
        a_lo = mid - alpha * half
        scale = (2 * alpha * half / 15).to(torch.bfloat16).float().clamp(min=1e-30)
        zero = (a_lo + 8 * scale).to(torch.bfloat16).float()
        q = torch.round((g - zero) / scale + 8).clamp(0, 15)
        deq = (q - 8) * scale + zero
        err = (deq - g).pow(2).sum(-1, keepdim=True)
        better = err < best_err
        best = torch.where(better, deq, best)
        best_err = torch.where(better, err, best_err)
    return best.view(n, k)


src = resolve_model_path(None)
out.mkdir(parents=True, exist_ok=True)
for f in src.iterdir():
    if f.is_file() and f.name != "model.safetensors":
        shutil.copy(f, out / f.name)
tensors = load_file(src / "model.safetensors")
moved, err2, norm2 = 0, 0.0, 0.0
for name, w in tensors.items():
    if w.dim() != 2 or quantize_on_grid(w) is None:  # the 210 linear layers are on it
        continue
    rolled = torch.roll(w, -offset, dims=1)
    fake = (
        fake_int4_clipped(rolled) if clip else dequantize_int4(*quantize_int4_groups(rolled, GROUP))
    )
    deq = torch.roll(fake, offset, dims=1)
    err2 += float((deq - w).pow(2).sum())
    norm2 += float(w.pow(2).sum())
    tensors[name] = deq.contiguous()
    moved += 1
save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
print(
    f"offset {offset}{' clip' if clip else ''}: {moved} layers re-quantized, "
    f"relative RMS weight error {(err2 / norm2) ** 0.5:.4%} -> {out}"
)
