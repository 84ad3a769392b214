"""The engine alone (no Ray, no HTTP) under the traffic `vllm bench serve` sends: `c`
sequences in flight, each finished one replaced by a new prompt until `--num-prompts` have
run, so prompt chunks keep mixing into the decode steps as they do in the server.

    .venv/bin/python benchmarks/engine_steady.py --concurrency 8 32 --num-prompts 96

Output tok/s of this run against the server's (same load, `benchmarks/peer_bench.py`) says
how much the serving path costs; the split of time between steps that carry prompt chunks
and pure decode steps says how much prefill costs. Product defaults unless `--config`
overrides them. A benchmark, not a test: never asserted on.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from profile_decode import _build_engine


def run(engine, c: int, num_prompts: int, input_len: int, output_len: int, seed: int) -> dict:
    from serving.engine.sampling_params import SamplingParams
    from serving.engine.sequence import Sequence

    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    added = 0

    def add() -> None:
        nonlocal added
        prompt = torch.randint(100, 49152, (input_len,), generator=gen).tolist()
        engine.add_request(Sequence(f"s{c}-{added}-{time.monotonic_ns()}", prompt, params))
        added += 1

    for _ in range(min(c, num_prompts)):
        add()
    out_tokens, time_by_kind = 0, {"with prompt chunks": [0, 0.0], "decode only": [0, 0.0]}
    started = time.perf_counter()
    while engine.has_unfinished():
        step_started = time.perf_counter()
        outputs = engine.step()
        last = engine.last_step
        kind = "with prompt chunks" if last is not None and last.is_prefill else "decode only"
        time_by_kind[kind][0] += 1
        time_by_kind[kind][1] += time.perf_counter() - step_started
        for out in outputs:
            out_tokens += len(out.new_token_ids)
            if out.finished and added < num_prompts:
                add()
    wall_s = time.perf_counter() - started
    return {
        "concurrency": c,
        "output_tok_per_s": round(out_tokens / wall_s, 1),
        "wall_s": round(wall_s, 2),
        "steps": {
            kind: {
                "count": n,
                "ms_per_step": round(s * 1e3 / max(n, 1), 1),
                "share": round(s / wall_s, 3),
            }
            for kind, (n, s) in time_by_kind.items()
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--num-prompts", type=int, default=96)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", type=json.loads, default={}, help="config overrides as JSON")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"config: {vars(args)}", flush=True)
    engine = _build_engine(args.threads, 1024, args.config)
    results = []
    for c in args.concurrency:
        r = run(engine, c, args.num_prompts, args.input_len, args.output_len, args.seed)
        results.append(r)
        print(json.dumps(r), flush=True)
    print(
        "summary: "
        + ", ".join(f"c={r['concurrency']} {r['output_tok_per_s']} tok/s" for r in results)
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"args": {**vars(args), "out": str(args.out)}, "results": results}
        args.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
