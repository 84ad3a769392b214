"""How many sessions of 1,024-token history one decode engine holds within a fixed KV
budget, per staged-KV profile, and what dequantizing costs in decode tokens/s.

Standalone engine (no Ray), the default model at bfloat16 with its int4 decode path, as a
decode replica runs it. For each profile:

1. *capacity*: `--sessions` requests with 1,024-token prompts (WikiText-2) are offered at
   once to an engine whose pool is `--budget-mib` of KV; once admissions stop, the number
   of sequences decoding together is what the budget holds (the rest wait);
2. *speed*: with exactly `--batch` of those sessions resident (every one demoted as far as
   the profile allows, as under pressure), decode tokens/s over `--steps` steps.

    .venv/bin/python benchmarks/kv_sessions.py --out benchmarks/results/2026-11-22/kv_sessions
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

PROFILES = ("baseline", "safe", "balanced", "aggressive")
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2-dev.txt"


def _prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    ids = tokenizer(WIKITEXT.read_text(encoding="utf-8")[: 40 * length * n])["input_ids"]
    return [ids[i * length : (i + 1) * length] for i in range(n)]


def _engine(model, profile: str, num_blocks: int, unit_tokens: int):
    from serving.engine.engine import EngineConfig, LLMEngine

    cfg = EngineConfig(
        num_blocks=num_blocks, block_size=16, max_num_seqs=256, max_num_batched_tokens=2048,
        max_model_len=2048, kv_dtype="bfloat16", kv_profile=profile, kv_unit_tokens=unit_tokens,
    )  # fmt: skip
    return LLMEngine(model, cfg, model.arch.eos_token_ids)


def _add(engine, prompts: list[list[int]], max_tokens: int) -> None:
    from serving.engine.sampling_params import SamplingParams
    from serving.engine.sequence import Sequence

    for i, ids in enumerate(prompts):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        engine.add_request(Sequence(f"s{i}", list(ids), params))


def capacity(model, prompts, profile: str, num_blocks: int, unit_tokens: int) -> dict:
    """Offer every prompt at once; count the sessions decoding together at steady state."""
    engine = _engine(model, profile, num_blocks, unit_tokens)
    _add(engine, prompts, max_tokens=4096)
    held, stable = 0, 0
    for _ in range(10 * len(prompts) + 200):
        engine.step()
        if engine.num_running > held:
            held, stable = engine.num_running, 0
        elif engine.num_running and all(
            s.num_computed_tokens >= len(s.prompt_token_ids) for s in engine.scheduler.running
        ):
            stable += 1
        if stable >= 40:  # 40 decode steps with no new admission: the budget is full
            break
    levels = engine.staged.bytes_per_level()
    return {
        "sessions_held": held,
        "preemptions": engine.num_preemptions,
        "bytes_per_level": levels,
        "kv_bytes_per_token": sum(v for k, v in levels.items() if k != "L3")
        / max(1, sum(s.num_tokens for s in engine.scheduler.running)),
    }


def speed(model, prompts, profile: str, unit_tokens: int, steps: int) -> dict:
    """Decode tokens/s with `len(prompts)` resident sessions, demoted as far as allowed."""
    per_seq = -(-(len(prompts[0]) + steps + 64) // 16)
    engine = _engine(model, profile, per_seq * len(prompts) + 64, unit_tokens)
    _add(engine, prompts, max_tokens=steps + 32)
    while engine.scheduler.waiting or any(
        s.num_uncomputed_tokens > 1 for s in engine.scheduler.running
    ):
        engine.step()  # every prompt prefilled before timing starts
    engine.staged.rebalance(engine.scheduler.running, pressure=1.0)
    engine.rebalance_every = 10**9  # hold those levels while timing
    for _ in range(4):  # warm up
        engine.step()
    started, cpu_started = time.perf_counter(), time.process_time()
    tokens = 0
    for _ in range(steps):
        tokens += sum(len(o.new_token_ids) for o in engine.step())
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    return {
        "decode_tokens_per_s": tokens / elapsed,
        # CPU seconds per token: steadier than wall time on a shared machine
        "cpu_ms_per_token": 1000 * cpu / max(1, tokens),
        "batch": len(prompts),
        "blocks_per_level": engine.staged.blocks_per_level(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-mib", type=float, default=96.0)
    parser.add_argument("--history", type=int, default=1024)
    parser.add_argument("--sessions", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--unit-tokens", type=int, default=128)
    parser.add_argument("--profiles", nargs="*", default=list(PROFILES))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from serving.models.loader import load_model
    from serving.models.pull import ensure_default_model

    torch.set_num_threads(args.threads)
    folder = ensure_default_model(progress=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_model(folder, torch.bfloat16, max_positions=2049, int4_max_tokens=8)
    arch = model.arch
    block_bytes = arch.num_layers * 2 * 16 * arch.num_kv_heads * arch.head_dim * 2
    num_blocks = int(args.budget_mib * 2**20 // block_bytes)
    prompts = _prompts(tokenizer, args.sessions, args.history)
    results: dict = {
        "budget_mib": args.budget_mib, "history_tokens": args.history, "num_blocks": num_blocks,
        "unit_tokens": args.unit_tokens, "load_avg": os.getloadavg(), "profiles": {},
    }  # fmt: skip
    for profile in args.profiles:
        print(f"[{profile}] capacity within {args.budget_mib} MiB ...", flush=True)
        cap = capacity(model, prompts, profile, num_blocks, args.unit_tokens)
        print(f"[{profile}] holds {cap['sessions_held']} sessions; decode speed ...", flush=True)
        spd = speed(model, prompts[: args.batch], profile, args.unit_tokens, args.steps)
        results["profiles"][profile] = cap | spd
        print(f"[{profile}] {spd['decode_tokens_per_s']:.1f} tok/s at batch {args.batch}")
    base = results["profiles"].get("baseline")
    if base:
        for r in results["profiles"].values():
            r["sessions_vs_baseline"] = r["sessions_held"] / max(1, base["sessions_held"])
            r["speed_vs_baseline"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    _plot(results, args.out.with_suffix(".png"))
    print(json.dumps(results["profiles"], indent=2))
    return 0


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["profiles"])
    held = [results["profiles"][n]["sessions_held"] for n in names]
    tps = [results["profiles"][n]["decode_tokens_per_s"] for n in names]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.bar(names, held, color="tab:blue")
    a.set_title(
        f"sessions of {results['history_tokens']} tokens held in {results['budget_mib']:.0f} MiB"
    )
    b.bar(names, tps, color="tab:orange")
    b.set_title("decode tokens/s (same batch, demoted as far as allowed)")
    for ax, vals in ((a, held), (b, tps)):
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}" if ax is a else f"{v:.1f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
