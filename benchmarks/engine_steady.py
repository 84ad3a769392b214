"""The engine alone (no Ray, no HTTP) under the traffic `vllm bench serve` sends: `c`
sequences in flight, each finished one replaced by a new prompt until `--num-prompts` have
run, so prompt chunks keep mixing into the decode steps as they do in the server.

    .venv/bin/python benchmarks/engine_steady.py --concurrency 8 32 --num-prompts 96

Output tok/s of this run against the server's (same load, `benchmarks/peer_bench.py`) says
how much the serving path costs; the split of time between steps that carry prompt chunks,
speculative steps and plain decode steps says how much prefill costs. Product defaults
(speculation attached as the decode replica attaches it) unless `--config` overrides them.
`--co-runner 2 10` runs a process busy 2 ms of every 10 beside the engine, as the HTTP
client, the ingress and Ray's processes share the cores in the server. A benchmark, not a
test: never asserted on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from profile_decode import _build_engine


def attach_product_speculation(engine, overrides: dict) -> None:
    """Speculation as the decode replica attaches it (`serving.spec.replica`): on by
    default, the gate measuring per batch size whether it pays."""
    from serving.config import InferosConfig
    from serving.models.hf_folder import resolve_model_path
    from serving.spec.replica import attach_speculation

    config = InferosConfig.model_validate(overrides)
    if config.speculation.enabled:
        attach_speculation(engine, config, resolve_model_path(None))


def spec_steps(engine) -> int:
    return 0 if engine.spec is None else engine.spec.stats.num_spec_steps


# A process that computes `busy` seconds of every `period` and sleeps the rest: a stand-in
# for what shares the cores with the engine in the server (the HTTP client, the ingress,
# Ray's processes), which wake in short bursts.
CO_RUNNER = """
import sys, time
busy, period = float(sys.argv[1]), float(sys.argv[2])
while True:
    started = time.perf_counter()
    while time.perf_counter() - started < busy:
        pass
    time.sleep(period - busy)
"""


def start_co_runner(busy_ms: float, period_ms: float) -> subprocess.Popen:
    # a busy time past the period would make the child's sleep raise and the run go on
    # without the co-runner it claims
    if not 0 < busy_ms < period_ms:
        raise SystemExit(f"--co-runner: need 0 < BUSY_MS < PERIOD_MS, got {busy_ms} {period_ms}")
    args = [sys.executable, "-c", CO_RUNNER, str(busy_ms / 1e3), str(period_ms / 1e3)]
    return subprocess.Popen(args)


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
    out_tokens = 0
    time_by_kind = {
        "with prompt chunks": [0, 0.0],
        "decode only": [0, 0.0],
        "speculative": [0, 0.0],
    }
    started = time.perf_counter()
    while engine.has_unfinished():
        step_started = time.perf_counter()
        spec_steps_before = spec_steps(engine)
        outputs = engine.step()
        last = engine.last_step
        kind = "with prompt chunks" if last is not None and last.is_prefill else "decode only"
        if spec_steps(engine) > spec_steps_before:
            kind = "speculative"
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
    ap.add_argument(
        "--co-runner",
        nargs=2,
        type=float,
        metavar=("BUSY_MS", "PERIOD_MS"),
        help="run a process busy BUSY_MS of every PERIOD_MS beside the engine",
    )
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"config: {vars(args)}", flush=True)
    engine = _build_engine(args.threads, 1024, args.config)
    attach_product_speculation(engine, args.config)
    results = []
    co_runner = start_co_runner(*args.co_runner) if args.co_runner else None
    try:
        for c in args.concurrency:
            r = run(engine, c, args.num_prompts, args.input_len, args.output_len, args.seed)
            results.append(r)
            print(json.dumps(r), flush=True)
    finally:
        if co_runner is not None:
            co_runner.kill()
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
