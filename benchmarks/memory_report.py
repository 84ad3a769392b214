"""Peak memory of one engine replica per weights format x KV profile x concurrency (issue 16,
item 5), split the way a VRAM report splits parameters from activations: weights, the KV
pool's budget and use, workspace (peak RSS above the loaded state) and the rest of the
process (Python, torch, tokenizer: RSS minus the others).

    .venv/bin/python benchmarks/memory_report.py --out-dir benchmarks/results/DATE/memory

Each cell runs in a fresh process (a peak is process-wide): the engine with the default
model, `c` sequences of `--input-len` prompt tokens decoding `--output-len` tokens, then
`serving.memory` reads the process. Writes memory.json, memory.md (a table) and memory.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cell(weights: str, profile: str, c: int, input_len: int, output_len: int) -> dict:
    """One measurement, in this process."""
    import torch

    sys.path.insert(0, str(HERE))
    from profile_decode import _build_engine

    from serving.engine.sampling_params import SamplingParams
    from serving.engine.sequence import Sequence
    from serving.memory import MemoryAccount, model_of, return_freed_heap

    torch.set_num_threads(2)
    overrides = {"model": {"weights": weights}, "kv_cache": {"profile": profile}}
    engine = _build_engine(2, 1024, overrides)
    return_freed_heap()  # as an engine replica does after loading
    pool = engine.block_pool
    account = MemoryAccount.after_load(model_of(engine), pool.num_blocks * pool.block_bytes)
    gen = torch.Generator().manual_seed(c)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i in range(c):
        prompt = torch.randint(100, 49152, (input_len,), generator=gen).tolist()
        engine.add_request(Sequence(f"m{i}-{time.monotonic_ns()}", prompt, params))
    peak_kv = 0
    while engine.has_unfinished():
        engine.step()
        peak_kv = max(peak_kv, pool.used_bytes)
    sample = account.sample(peak_kv)
    # the pool is zero-filled when it is made, so all of it is resident, used or not
    other = sample["rss"] - sample["weights"] - sample["workspace_peak"] - sample["kv_budget"]
    return {"weights_format": weights, "kv_profile": profile, "concurrency": c,
            **sample, "kv_used_peak": peak_kv, "other": max(0, other)}  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = ("weights", "kv_budget", "workspace_peak", "other")
    labels = [f"{r['weights_format']}\n{r['kv_profile']}\nc={r['concurrency']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.7), 5))
    bottom = [0.0] * len(rows)
    for part in parts:
        values = [r[part] / 2**20 for r in rows]
        ax.bar(labels, values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("MiB at the peak")
    ax.set_title("engine replica memory: weights format x KV profile x concurrency")
    ax.legend()
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(rows: list[dict]) -> str:
    head = (
        "| weights | KV profile | c | weights MiB | KV pool MiB (peak use) | workspace MiB "
        "| other MiB | RSS MiB |"
    )
    lines = [head, "|" + "---|" * 3 + "---:|" * 5]
    for r in rows:
        mb = {
            k: f"{r[k] / 2**20:.0f}"
            for k in ("weights", "kv_budget", "kv_used_peak", "workspace_peak", "other", "rss")
        }
        pool = f"{mb['kv_budget']} ({mb['kv_used_peak']})"
        lines.append(f"| {r['weights_format']} | {r['kv_profile']} | {r['concurrency']} | "
                     f"{mb['weights']} | {pool} | {mb['workspace_peak']} | "
                     f"{mb['other']} | {mb['rss']} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--weights", nargs="+", default=["auto", "bf16", "int8", "int4"])
    p.add_argument("--profiles", nargs="+", default=["baseline", "aggressive"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 32])
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--out-dir", type=Path)
    p.add_argument("--replot", action="store_true", help="table and plot from --out-dir's JSON")
    p.add_argument("--cell", nargs=3, metavar=("WEIGHTS", "PROFILE", "C"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cell:
        weights, profile, c = args.cell
        print(json.dumps(cell(weights, profile, int(c), args.input_len, args.output_len)))
        return
    if args.replot:
        record = json.loads((args.out_dir / "memory.json").read_text())
        rows = record["rows"]
        for r in rows:  # `other` as `cell` computes it now
            r["other"] = max(0, r["rss"] - r["weights"] - r["workspace_peak"] - r["kv_budget"])
        write(args.out_dir, rows, record["args"])
        print(table(rows))
        return
    cells = list(itertools.product(args.weights, args.profiles, args.concurrency))
    rows = []
    for i, (weights, profile, c) in enumerate(cells, 1):
        started = time.perf_counter()
        out = subprocess.run(
            [sys.executable, __file__, "--cell", weights, profile, str(c),
             "--input-len", str(args.input_len), "--output-len", str(args.output_len)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        mib = {k: r[k] / 2**20 for k in ("rss", "weights", "kv_used_peak", "workspace_peak")}
        took = time.perf_counter() - started
        print(f"[{i}/{len(cells)}] {weights:5} {profile:10} c={c:<3} RSS {mib['rss']:6.0f} MiB "
              f"(weights {mib['weights']:.0f}, KV {mib['kv_used_peak']:.0f}, "
              f"workspace {mib['workspace_peak']:.0f}) in {took:.0f} s", flush=True)  # fmt: skip
    print(table(rows))
    if args.out_dir:
        write(args.out_dir, rows, {k: v for k, v in vars(args).items() if k != "out_dir"})


def write(out_dir: Path, rows: list[dict], run_args: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"args": run_args, "rows": rows}
    (out_dir / "memory.json").write_text(json.dumps(record, indent=1))
    (out_dir / "memory.md").write_text(table(rows) + "\n")
    plot(rows, out_dir / "memory.png")


if __name__ == "__main__":
    main()
