"""Where a decode step's time goes: the torch engine alone (no Ray, no HTTP), product
defaults (`model.dtype: auto`, measured dense kernels, int4 path), `c` sequences in steady
decode, profiled with the torch profiler and summed by kind of work.

    .venv/bin/python benchmarks/profile_decode.py --concurrency 1 8 32 --threads 2

Prints per concurrency: ms per decode step, output tok/s, and the share of matmuls,
attention, KV gathers, copies/casts, sampling and the rest (Python and small ops); with
`--out`, writes the same as JSON. A benchmark, not a test: never asserted on.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# aten op name → kind of work (first match wins); anything else is "other ops"
KINDS: list[tuple[str, tuple[str, ...]]] = [
    ("matmul", ("aten::linear", "aten::addmm", "aten::mm", "_weight_int4pack", "_weight_int8")),
    ("attention", ("aten::bmm", "aten::matmul", "scaled_dot_product", "softmax", "inferos::")),
    ("kv gather/write", ("aten::index_select", "aten::index_copy", "aten::index")),
    ("copies/casts", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::cat", "aten::clone")),
    ("sampling", ("aten::argmax", "aten::multinomial", "aten::topk", "aten::sort")),
]


def _kind(name: str) -> str:
    for kind, prefixes in KINDS:
        if any(p in name for p in prefixes):
            return kind
    return "other ops"


def _build_engine(threads: int, num_blocks: int, overrides: dict):
    from serving.backends.base import BackendContext
    from serving.backends.registry import build_engine
    from serving.config import InferosConfig
    from serving.messages import Role
    from serving.models.hf_folder import resolve_model_path

    cfg = InferosConfig.model_validate({"kv_cache": {"num_blocks": num_blocks}, **overrides})
    ctx = BackendContext(cfg, Role.DECODE, resolve_model_path(None), threads)
    engine, _ = build_engine("torch", ctx)
    return engine


def profile_concurrency(engine, c: int, prompt_tokens: int, steps: int) -> dict:
    from serving.engine.sampling_params import SamplingParams
    from serving.engine.sequence import Sequence

    gen = torch.Generator().manual_seed(c)
    params = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    prompts = torch.randint(100, 49152, (c, prompt_tokens), generator=gen).tolist()
    for i, prompt in enumerate(prompts):
        engine.add_request(Sequence(f"p{c}-{i}-{time.monotonic_ns()}", prompt, params))

    def prefilling() -> bool:
        running = engine.scheduler.running
        return any(s.num_computed_tokens < len(s.prompt_token_ids) for s in running)

    while engine.num_waiting or prefilling():
        engine.step()  # prefill (chunks) until every sequence decodes
    for _ in range(3):
        engine.step()  # warm-up decode steps
    started = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall_ms = (time.perf_counter() - started) * 1e3 / steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    shares: dict[str, float] = {}
    total_us = 0.0
    for event in prof.key_averages():
        # self time: every microsecond is counted once, in the op that spent it
        shares[_kind(event.key)] = shares.get(_kind(event.key), 0.0) + event.self_cpu_time_total
        total_us += event.self_cpu_time_total
    profiled_ms = (sum(shares.values()) / steps) / 1e3
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    for seq in list(engine.scheduler.running):
        engine.abort(seq.req_id)
    return {
        "concurrency": c,
        "ms_per_step": round(wall_ms, 2),
        "tok_per_s": round(c * 1e3 / wall_ms, 1),
        "ops_ms_per_step": round(profiled_ms, 2),
        "share": {
            k: round(v / total_us, 3) for k, v in sorted(shares.items(), key=lambda kv: -kv[1])
        },
        "top_ops_ms_per_step": {e.key: round(e.self_cpu_time_total / steps / 1e3, 2) for e in top},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="decode steps timed and profiled")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-blocks", type=int, default=1024)
    ap.add_argument(
        "--config",
        type=json.loads,
        default={},
        help='config overrides as JSON, e.g. \'{"model": {"dtype": "float32"}}\'',
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(f"config: {vars(args)}", flush=True)
    engine = _build_engine(args.threads, args.num_blocks, args.config)
    results = []
    for c in args.concurrency:
        r = profile_concurrency(engine, c, args.prompt_tokens, args.steps)
        results.append(r)
        print(json.dumps(r, indent=1), flush=True)
    print(
        "summary: "
        + ", ".join(
            f"c={r['concurrency']} {r['tok_per_s']} tok/s ({r['ms_per_step']} ms/step)"
            for r in results
        )
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"args": vars(args) | {"out": str(args.out)}, "results": results}
        args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
