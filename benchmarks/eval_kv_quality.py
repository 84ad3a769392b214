"""The KV quality table: every profile's KV bytes per token, reduction vs FP16, PPL, ΔPPL %
and KLD on a text at one context, by `inferos eval ppl` (one run, baseline shared).
Writes `kv_quality.json`, `kv_quality.md` and `kv_quality.png` (ΔPPL vs reduction) to
`benchmarks/results/<date>/` unless `--out-dir` says otherwise.

    .venv/bin/python benchmarks/eval_kv_quality.py --text ../shared/data/wikitext2-dev.txt \
        --context 2048 --max-tokens 16384
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BARS = {"safe": (0.2, 1.9), "balanced": (2.0, 3.0), "aggressive": (5.0, 4.0)}  # ΔPPL %, x


def markdown(results: list[dict], load: str) -> str:
    r0 = results[0]
    lines = [
        f"Text `{Path(r0['text']).name}`, context {r0['context']}, {r0['num_tokens']} scored "
        f"tokens, model {r0['model']}, pressure {r0['pressure']}, importance "
        f"{r0['importance']}, chunk {r0['chunk']}; load during the run: {load}. KV bytes are "
        f"those held for a sequence of exactly {r0['context']} tokens; the last column "
        "averages over every length of the second half (a partly filled unit at L0).",
        "",
        "| profile | KV bytes/token | reduction vs FP16 | PPL | ΔPPL % | KLD | bar (ΔPPL ≤, ≥ x) "
        f"| reduction, mean over lengths {r0['context'] // 2}-{r0['context']} |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        bar = BARS.get(r["profile"])
        verdict = ""
        if bar:
            ok = r["delta_ppl_pct"] <= bar[0] and r["reduction_vs_fp16"] >= bar[1]
            verdict = f"{bar[0]} %, {bar[1]}x: {'met' if ok else 'NOT met'}"
        lines.append(
            f"| {r['profile']} | {r['kv_bytes_per_token']:.0f} | {r['reduction_vs_fp16']:.2f}x"
            f" | {r['ppl']:.4f} | {r['delta_ppl_pct']:+.3f} | {r['kld']:.5f} | {verdict} "
            f"| {r['fp16_bytes_per_token'] / r['kv_bytes_per_token_decode_mean']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.scatter(r["reduction_vs_fp16"], r["delta_ppl_pct"], s=40)
        ax.annotate(r["profile"], (r["reduction_vs_fp16"], r["delta_ppl_pct"]), xytext=(5, 5),
                    textcoords="offset points")  # fmt: skip
    for name, (dppl, reduction) in BARS.items():
        ax.scatter([reduction], [dppl], marker="x", color="grey")
        ax.annotate(f"{name} bar", (reduction, dppl), xytext=(5, -10), textcoords="offset points",
                    color="grey", fontsize=8)  # fmt: skip
    ax.set_xlabel("KV reduction vs FP16 (x)")
    ax.set_ylabel("ΔPPL vs baseline (%)")
    r0 = results[0]
    ax.set_title(f"{r0['model']}, context {r0['context']}, {r0['num_tokens']} tokens")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--text", type=Path, default=ROOT.parent / "shared/data/wikitext2-dev.txt")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--profiles", default="baseline,safe,balanced,aggressive")
    p.add_argument("--importance", default="none")
    p.add_argument("--out-dir", type=Path)
    args = p.parse_args()
    out_dir = args.out_dir or ROOT / "benchmarks/results" / dt.date.today().isoformat()
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "kv_quality.json"
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    cmd = [sys.executable, "-m", "serving.cli", "eval", "ppl", "--text", str(args.text)]
    cmd += ["--profile", args.profiles, "--context", str(args.context), "--threads", "1"]
    cmd += ["--max-tokens", str(args.max_tokens), "--importance", args.importance]
    cmd += ["--out", str(json_path)]
    subprocess.run(cmd, check=True, cwd=ROOT)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    results = json.loads(json_path.read_text())
    results = results if isinstance(results, list) else [results]
    load = f"loadavg {' '.join(load_before)} before, {' '.join(load_after)} after (2 cores)"
    table = markdown(results, load)
    (out_dir / "kv_quality.md").write_text(table)
    plot(results, out_dir / "kv_quality.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
