"""One layer's decode attention: the C++ paged kernel against today's torch path
(`_decode_attention` with the kernel switched off), side by side in one run.

SmolLM2-135M's shapes (9 query heads, 3 KV heads, head_dim 64, blocks of 16), every
sequence at the same context, blocks shuffled over the pool. The two paths alternate call
by call, so load from other work on the machine hits both alike; report the ratio.

    .venv/bin/python benchmarks/attention_kernel.py [--threads 2] [--calls 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from serving.kernels.paged_attention import kernel_available
from serving.models import attention
from serving.spec.forward import make_metadata

HQ, HKV, D, BLOCK = 9, 3, 64, 16


def _case(batch: int, context: int, dtype: torch.dtype, gen: torch.Generator):
    per_seq = -(-context // BLOCK)
    num_blocks = batch * per_seq + 16
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [pool[i * per_seq : (i + 1) * per_seq] for i in range(batch)]
    _, meta = make_metadata(tables, [context - 1] * batch, [1] * batch, BLOCK)
    cache = torch.randn((2, num_blocks, BLOCK, HKV, D), generator=gen).to(dtype)
    q = torch.randn((batch, HQ, D), generator=gen).to(dtype)
    return q, cache, meta


def _time_pair(fns, calls: int) -> list[float]:
    for fn in fns:  # warm-up
        fn()
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(calls):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e6 for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    assert kernel_available(), "the kernel did not build"
    gen = torch.Generator().manual_seed(0)
    print(
        f"config: threads={args.threads} calls={args.calls} heads={HQ}/{HKV} head_dim={D} "
        f"block={BLOCK} torch={torch.__version__} loadavg={os.getloadavg()[0]:.2f}"
    )
    print(f"{'dtype':>8} {'batch':>5} {'ctx':>4} {'torch us':>9} {'kernel us':>9} {'speedup':>7}")
    original = attention.kernel_supports
    ratios = []
    for dtype in (torch.bfloat16, torch.float32):
        for batch in (1, 8, 32):
            for context in (128, 256):
                q, cache, meta = _case(batch, context, dtype, gen)
                scale = D**-0.5

                def torch_path(q=q, cache=cache, meta=meta, scale=scale):
                    attention.kernel_supports = lambda q, c: False
                    try:
                        return attention._decode_attention(q, cache, meta, scale)
                    finally:
                        attention.kernel_supports = original

                def kernel(q=q, cache=cache, meta=meta, scale=scale):
                    return attention._decode_attention(q, cache, meta, scale)

                t_torch, t_kernel = _time_pair([torch_path, kernel], args.calls)
                ratios.append(t_torch / t_kernel)
                name = str(dtype).removeprefix("torch.")
                print(
                    f"{name:>8} {batch:>5} {context:>4} {t_torch:>9.1f} {t_kernel:>9.1f} "
                    f"{t_torch / t_kernel:>6.2f}x"
                )
    geo = statistics.geometric_mean(ratios)
    print(
        f"summary: kernel speedup over torch path geomean {geo:.2f}x "
        f"(min {min(ratios):.2f}x, max {max(ratios):.2f}x), loadavg {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
