"""Decode tokens/s and memory of the torch vs the ONNX Runtime backend, side by side.

Each backend runs in its own subprocess (clean peak RSS), built through
`serving.backends.registry.build_engine` exactly as a decode replica builds it. Per
concurrency c: c prompts of --prompt-tokens are prefilled (not timed), then the decode
steps that generate --max-tokens each are timed. Runs alternate backends --rounds times and
report the median, since the box is shared. Fixed seed; prints its config and one summary
line per (backend, concurrency); --out writes JSON.

  .venv/bin/python benchmarks/backend_decode.py --concurrency 1 8 \
      --out benchmarks/results/backend_decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = {  # label → (backend, model dtype)
    "torch-bf16": ("torch", "bfloat16"),
    "torch-fp32": ("torch", "float32"),
    "onnxruntime-fp32": ("onnxruntime", "float32"),
}


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(args: argparse.Namespace) -> dict:
    """One backend, every concurrency; runs in a fresh process."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    from serving.backends.base import BackendContext
    from serving.backends.registry import build_engine
    from serving.config import InferosConfig
    from serving.engine.sampling_params import SamplingParams
    from serving.engine.sequence import Sequence
    from serving.messages import Role
    from serving.models.hf_folder import resolve_model_path

    backend, dtype = BACKENDS[args.worker]
    cfg = InferosConfig.model_validate(
        {
            "model": {"dtype": dtype},
            "kv_cache": {"num_blocks": args.num_blocks},
            "decode": {"backend": backend, "execution_providers": ["CPUExecutionProvider"]},
        }
    )
    rss_start = _rss_mib()
    engine, info = build_engine(
        backend, BackendContext(cfg, Role.DECODE, resolve_model_path(None), args.threads)
    )
    rss_built = _rss_mib()
    vocab = 49152
    gen = torch.Generator().manual_seed(0)
    out: dict = {"backend": args.worker, "device": info.device, "runs": {}}
    for c in [1, *args.concurrency]:  # a first c=1 run warms up and is dropped
        prompts = torch.randint(100, vocab, (c, args.prompt_tokens), generator=gen).tolist()
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        for i, p in enumerate(prompts):
            engine.add_request(Sequence(f"c{c}-{i}-{time.monotonic_ns()}", p, params))
        decode_s, decode_tokens = 0.0, 0
        while engine.has_unfinished():
            t0 = time.perf_counter()
            outputs = engine.step()
            dt = time.perf_counter() - t0
            if engine.last_step is not None and not engine.last_step.is_prefill:
                decode_s += dt
                decode_tokens += sum(len(o.new_token_ids) for o in outputs)
        out["runs"].setdefault(str(c), []).append(decode_tokens / decode_s)
    out["runs"]["1"] = out["runs"]["1"][1:] or out["runs"]["1"]
    runner = engine.runner
    out["memory_mib"] = {
        "rss_after_build": round(rss_built - rss_start, 1),
        "peak_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "kv_pool": round(runner.kv_bytes / 2**20, 1),
        "step_buffers": round(getattr(getattr(runner, "buffers", None), "num_bytes", 0) / 2**20, 1),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--num-blocks", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", choices=list(BACKENDS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    config = {k: v for k, v in vars(args).items() if k not in ("worker", "out")}
    print("config:", json.dumps(config, default=str), "| load:", os.getloadavg())
    results: dict[str, list[dict]] = {b: [] for b in args.backends}
    for _ in range(args.rounds):
        for b in args.backends:  # alternate, so drifting load hits every backend alike
            cmd = [sys.executable, __file__, "--worker", b] + [
                a for a in sys.argv[1:] if a not in ("--out",)
            ]
            if args.out:
                cmd = [a for a in cmd if a != str(args.out)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                sys.exit(f"{b} failed:\n{proc.stderr[-3000:]}")
            results[b].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    summary: dict = {"config": config, "load_avg_end": os.getloadavg(), "backends": {}}
    for b, runs in results.items():
        tps = {
            c: round(statistics.median(x for r in runs for x in r["runs"][str(c)]), 1)
            for c in args.concurrency
        }
        mem = runs[-1]["memory_mib"]
        summary["backends"][b] = {
            "device": runs[-1]["device"],
            "decode_tok_s": tps,
            "memory_mib": mem,
        }
        for c in args.concurrency:
            print(
                f"{b:18s} c={c:<2d} decode {tps[c]:7.1f} tok/s | weights+pool "
                f"{mem['rss_after_build']:.0f} MiB (KV pool {mem['kv_pool']:.0f}, step buffers "
                f"{mem['step_buffers']:.0f}) | peak RSS {mem['peak_rss']:.0f} MiB"
            )
    first = next(iter(summary["backends"]))
    base = summary["backends"][first]
    for s in summary["backends"].values():
        s["ratio_vs_" + first] = {
            c: round(s["decode_tok_s"][c] / base["decode_tok_s"][c], 2) for c in args.concurrency
        }
    print("load at end:", os.getloadavg())
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
