"""The 4 linear shapes of SmolLM2 x 30 layers, each with its own random weights (as a forward
pass reads them: from memory or a far cache), at M rows: the AMX int4 kernel against the
dense bf16 path (oneDNN, weights prepacked as the product does), median of 5 passes after
2 warm-ups, two measurements each, interleaved. Prints ms per 30-layer pass.

    .venv/bin/python benchmarks/results/2026-12-06/int4-amx/layers_cold.py [M ...]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from serving.kernels import q4_amx

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down
LAYERS = 30


def timed(fn, n: int = 5) -> float:
    fn()
    fn()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(rows: list[int]) -> None:
    torch.set_num_threads(2)
    assert q4_amx.kernel_available(), "no AMX here"
    amx, dense = [], []
    for _ in range(LAYERS):
        for n, k in SHAPES:
            q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
            scales = torch.rand(n, k // 32) * 0.02
            amx.append((q4_amx.pack_tiles(q, scales, -8 * scales), n, k))
            w = torch.randn(n, k, dtype=torch.bfloat16)
            dense.append((torch.ops.mkldnn._reorder_linear_weight(w, 32), n, k))
    for m in rows:
        x = {k: torch.randn(m, k).to(torch.bfloat16) for k in (576, 1536)}

        def run_amx(x: dict[int, torch.Tensor] = x) -> None:
            for packed, n, k in amx:
                q4_amx.q4_amx_linear(x[k], *packed, n)

        def run_dense(x: dict[int, torch.Tensor] = x) -> None:
            for w, _, k in dense:
                torch.ops.mkldnn._linear_pointwise(x[k], w, None, "none", [], "")

        a1, d1, a2, d2 = timed(run_amx), timed(run_dense), timed(run_amx), timed(run_dense)
        print(
            f"M={m}: amx {a1 * 1e3:.1f}/{a2 * 1e3:.1f} ms, dense bf16 {d1 * 1e3:.1f}/"
            f"{d2 * 1e3:.1f} ms, dense/amx {(d1 + d2) / (a1 + a2):.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1, 8, 16, 32, 48, 64])
