"""Plot one or more `compare_vllm.py` results side by side: output tok/s, TTFT p50 and
ITL p50 per concurrency, one bar per server. Writes a PNG next to the first input.

    .venv/bin/python benchmarks/plot_compare.py results/cmp_a/compare.json [more.json ...] \
        [--label-suffix "disaggregated" "colocated"] [--out FILE.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = (
    ("output_tokens_per_s", "output tokens/s (higher is better)"),
    ("ttft_p50", "TTFT p50 ms (lower is better)"),
    ("itl_p50", "ITL p50 ms (lower is better)"),
)


def _series(compare: dict, server: str) -> dict[int, dict[str, float]]:
    runs = compare["servers"].get(server, {}).get("runs", {})
    return {
        int(c): {
            "output_tokens_per_s": r["output_tokens_per_s"],
            "ttft_p50": r["ttft_ms"]["p50"],
            "itl_p50": r["itl_ms"]["p50"],
        }
        for c, r in runs.items()
        if r and r.get("completed")
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("inputs", nargs="+", type=Path)
    parser.add_argument("--label-suffix", nargs="*", default=None)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[int, dict[str, float]]] = {}
    for i, path in enumerate(args.inputs):
        data = json.loads(path.read_text())
        suffix = args.label_suffix[i] if args.label_suffix else path.parent.name
        if ours := _series(data, "ours"):
            series[f"Infer-OS ({suffix})"] = ours
        if (vllm := _series(data, "vllm")) and "vLLM" not in series:
            series["vLLM"] = vllm
    levels = sorted({c for s in series.values() for c in s})
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    width = 0.8 / max(len(series), 1)
    for ax, (key, title) in zip(axes, METRICS, strict=True):
        for j, (name, runs) in enumerate(series.items()):
            xs = [i + j * width for i in range(len(levels))]
            ax.bar(xs, [runs.get(c, {}).get(key, 0) for c in levels], width, label=name)
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(levels))])
        ax.set_xticklabels([f"c={c}" for c in levels])
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct, 128 in / 128 out, 2-core CPU")
    fig.tight_layout()
    out = args.out or args.inputs[0].with_name("compare.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
