"""Turn a `BenchRun` into the summary dict, a printed table, a JSON file and a PNG plot."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serving.bench.client import BenchRun

logger = logging.getLogger(__name__)

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True, slots=True)
class RunInfo:
    """The run's settings, copied verbatim to the top of the summary."""

    base_url: str
    model: str
    endpoint: str
    concurrency: int
    num_prompts: int
    input_len: int
    output_len: int
    seed: int
    tokenizer: str
    exact_input_len: bool


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    if not values:
        raise ValueError("percentile of an empty list")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def stats_ms(values_s: list[float]) -> dict[str, float | None]:
    """mean/p50/p90/p99 in milliseconds; None when there are no samples (keeps JSON keys fixed)."""
    keys = ["mean"] + [f"p{p}" for p in PERCENTILES]
    if not values_s:
        return dict.fromkeys(keys)
    values_ms = [v * 1000.0 for v in values_s]
    out: dict[str, float | None] = {"mean": sum(values_ms) / len(values_ms)}
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(values_ms, p)
    return out


def summarize(run: BenchRun, info: RunInfo) -> dict[str, Any]:
    ok = [r for r in run.records if r.ok]
    failed = [r for r in run.records if not r.ok]
    duration_s = run.duration_s
    output_tokens = sum(r.completion_tokens for r in ok)
    # Prefer the server's prompt count: it includes the chat template and any BOS token.
    input_tokens = sum(
        r.usage_prompt_tokens if r.usage_prompt_tokens is not None else r.prompt_tokens for r in ok
    )

    def per_s(x: float) -> float:
        return x / duration_s if duration_s > 0 else 0.0

    summary: dict[str, Any] = asdict(info)
    summary.update(
        completed=len(ok),
        failed=len(failed),
        duration_s=duration_s,
        request_throughput=per_s(len(ok)),
        output_tokens_per_s=per_s(output_tokens),
        total_tokens_per_s=per_s(input_tokens + output_tokens),
        total_input_tokens=input_tokens,
        total_output_tokens=output_tokens,
        ttft_ms=stats_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        itl_ms=stats_ms([x for r in ok for x in r.itl_s]),
        e2e_ms=stats_ms([r.e2e_s for r in ok]),
        tpot_ms=stats_ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        # A handful of distinct messages is enough to diagnose; thousands would bury the JSON.
        errors=sorted({r.error for r in failed if r.error})[:5],
    )
    return summary


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(summary: dict[str, Any]) -> str:
    lines = [
        "=" * 60,
        f"{'Benchmark result':^60}",
        "=" * 60,
        f"{'Base URL':<32}{summary['base_url']}",
        f"{'Model':<32}{summary['model']}",
        f"{'Endpoint':<32}{summary['endpoint']}",
        f"{'Concurrency':<32}{summary['concurrency']}",
        f"{'Input / output len (tokens)':<32}{summary['input_len']} / {summary['output_len']}",
        f"{'Completed / failed':<32}{summary['completed']} / {summary['failed']}",
        f"{'Duration (s)':<32}{summary['duration_s']:.2f}",
        f"{'Request throughput (req/s)':<32}{summary['request_throughput']:.2f}",
        f"{'Output tokens/s':<32}{summary['output_tokens_per_s']:.2f}",
        f"{'Total tokens/s':<32}{summary['total_tokens_per_s']:.2f}",
        "-" * 60,
        f"{'(ms)':<12}{'mean':>12}{'p50':>12}{'p90':>12}{'p99':>12}",
    ]
    for key, label in (
        ("ttft_ms", "TTFT"),
        ("itl_ms", "ITL"),
        ("tpot_ms", "TPOT"),
        ("e2e_ms", "E2E"),
    ):
        s = summary[key]
        lines.append(
            f"{label:<12}{_fmt(s['mean']):>12}{_fmt(s['p50']):>12}"
            f"{_fmt(s['p90']):>12}{_fmt(s['p99']):>12}"
        )
    if not summary["exact_input_len"]:
        lines.append("NOTE: input lengths are approximate (no tokenizer; words x 1.3)")
    for error in summary.get("errors", []):
        lines.append(f"error: {error}")
    lines.append("=" * 60)
    return "\n".join(lines)


def summary_line(summary: dict[str, Any]) -> str:
    ttft, itl = summary["ttft_ms"], summary["itl_ms"]
    return (
        f"bench {summary['model']} c={summary['concurrency']} "
        f"ok={summary['completed']}/{summary['num_prompts']}: "
        f"{summary['output_tokens_per_s']:.1f} out tok/s, "
        f"{summary['request_throughput']:.2f} req/s, "
        f"TTFT p50/p99 {_fmt(ttft['p50'])}/{_fmt(ttft['p99'])} ms, "
        f"ITL p50/p99 {_fmt(itl['p50'])}/{_fmt(itl['p99'])} ms"
    )


def write_json(summary: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def _token_timeline(run: BenchRun) -> tuple[list[float], list[float]]:
    """(seconds since start, cumulative output tokens), one point per streamed chunk."""
    events = sorted(
        (t - run.start_s, n)
        for r in run.records
        if r.ok
        for t, n in zip(r.chunk_times_s, r.tokens_per_chunk, strict=True)
    )
    times, totals, running = [0.0], [0.0], 0.0
    for t, n in events:
        running += n
        times.append(t)
        totals.append(running)
    return times, totals


def plot(run: BenchRun, summary: dict[str, Any], path: Path) -> bool:
    """TTFT histogram, ITL histogram, cumulative output tokens; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display on servers/CI
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; skipping the plot (pip install matplotlib)")
        return False
    ok = [r for r in run.records if r.ok]
    ttft_ms = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    itl_ms = [x * 1000 for r in ok for x in r.itl_s]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, values, title in ((axes[0], ttft_ms, "TTFT"), (axes[1], itl_ms, "ITL")):
        if values:
            ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="tab:blue")
            ax.axvline(percentile(values, 50), color="k", linestyle="--", label="p50")
            ax.axvline(percentile(values, 99), color="tab:red", linestyle=":", label="p99")
            ax.legend()
        ax.set(title=f"{title} (ms)", xlabel="ms", ylabel="count")
    times, totals = _token_timeline(run)
    axes[2].plot(times, totals, color="tab:green")
    axes[2].set(title="Cumulative output tokens", xlabel="seconds since start", ylabel="tokens")
    fig.suptitle(
        f"{summary['model']} @ {summary['base_url']}: c={summary['concurrency']}, "
        f"in={summary['input_len']}, out={summary['output_len']}, "
        f"{summary['output_tokens_per_s']:.1f} out tok/s"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def compare(results_a: dict[str, Any], results_b: dict[str, Any]) -> dict[str, float | None]:
    """a/b ratios, e.g. ours/vLLM: >1 is better for tokens/s, worse for the latencies."""
    return {
        "output_tokens_per_s": _ratio(
            results_a["output_tokens_per_s"], results_b["output_tokens_per_s"]
        ),
        "ttft_ms_p50": _ratio(results_a["ttft_ms"]["p50"], results_b["ttft_ms"]["p50"]),
        "itl_ms_p50": _ratio(results_a["itl_ms"]["p50"], results_b["itl_ms"]["p50"]),
    }
