"""Decode steps of the engine alone (product defaults, no Ray, no HTTP), `c` sequences of
128-token random prompts in steady decode, alternating within one process between the int4
layers on the AMX kernel (up to the row counts measured at load) and the same layers dense
(bf16): 6 rounds of 8 steps each way, medians. One process, interleaved, so the VM's drift
between runs (x2 over an hour here) cancels out.

    .venv/bin/python benchmarks/results/2026-12-06/int4-amx/engine_ab.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # benchmarks/

from profile_decode import _build_engine  # noqa: E402

from serving.engine.sampling_params import SamplingParams  # noqa: E402
from serving.engine.sequence import Sequence  # noqa: E402
from serving.models.int4 import HybridInt4Linear  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    engine = _build_engine(2, 1024, {})
    import gc

    layers = [o for o in gc.get_objects() if isinstance(o, HybridInt4Linear)]
    measured = [layer.max_int4_tokens for layer in layers]
    kernels = sorted({layer.kernel for layer in layers})
    print(f"int4 layers {len(layers)} ({kernels}), measured up to {sorted(set(measured))} rows")
    for c in (8, 32):
        gen = torch.Generator().manual_seed(c)
        params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
        for i, prompt in enumerate(torch.randint(100, 49152, (c, 128), generator=gen).tolist()):
            engine.add_request(Sequence(f"p{c}-{i}", prompt, params))
        running = engine.scheduler.running
        while engine.num_waiting or any(
            s.num_computed_tokens < len(s.prompt_token_ids) for s in running
        ):
            engine.step()
        times: dict[str, list[float]] = {"int4 kernel": [], "dense": []}
        for _ in range(6):
            for mode in times:
                for layer, tokens in zip(layers, measured, strict=True):
                    layer.max_int4_tokens = tokens if mode == "int4 kernel" else 0
                engine.step()
                started = time.perf_counter()
                for _ in range(8):
                    engine.step()
                times[mode].append((time.perf_counter() - started) / 8 * 1e3)
        for layer, tokens in zip(layers, measured, strict=True):
            layer.max_int4_tokens = tokens
        for seq in list(engine.scheduler.running):
            engine.abort(seq.req_id)
        med = {mode: statistics.median(t) for mode, t in times.items()}
        print(
            f"c={c}: ms per decode step, int4 kernel {med['int4 kernel']:.1f}, dense "
            f"{med['dense']:.1f}, dense/int4 {med['dense'] / med['int4 kernel']:.2f}; rounds "
            + str({mode: [round(t, 1) for t in ts] for mode, ts in times.items()}),
            flush=True,
        )


if __name__ == "__main__":
    main()
