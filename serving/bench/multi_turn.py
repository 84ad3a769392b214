"""`inferos bench --multi-turn`: chat sessions that each send their next turn after the
previous answer, with the whole history, and TTFT reported per turn.

Turn 1 is `--input-len` tokens of text as the user's message; every later turn appends the
answer and `--turn-len` new tokens of text. Sessions run concurrently (`--sessions`), each
one sequential, and send an `X-Session-Id` header (servers that route on it keep a
conversation on one replica). What a KV cache reused across turns buys shows as TTFT
of turns 2+ against turn 1 — and against a server with reuse off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from serving.bench.client import ClientConfig, make_client, resolve_api_key, resolve_model
from serving.bench.prompts import build_prompts, load_token_counter, read_source_text
from serving.bench.report import percentile


async def _session(
    client, model: str, config: ClientConfig, sid: int, first: str, extras: list[str], turns: int
) -> list[dict[str, Any]]:
    messages: list[dict[str, str]] = [{"role": "user", "content": first}]
    records = []
    for turn in range(1, turns + 1):
        started = time.perf_counter()
        record: dict[str, Any] = {"session": sid, "turn": turn, "ttft_s": None, "error": None}
        answer = []
        try:
            stream = await client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=config.max_tokens,
                temperature=config.temperature,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers={"X-Session-Id": f"bench-{sid}"},
                extra_body={"ignore_eos": True, "min_tokens": config.max_tokens}
                if config.ignore_eos
                else None,
            )
            async with stream:
                async for chunk in stream:
                    if chunk.usage is not None:
                        record["prompt_tokens"] = chunk.usage.prompt_tokens
                    if chunk.choices and chunk.choices[0].delta.content:
                        if record["ttft_s"] is None:
                            record["ttft_s"] = time.perf_counter() - started
                        answer.append(chunk.choices[0].delta.content)
        except Exception as e:  # a failed turn is a data point; the session stops there
            record["error"] = f"{type(e).__name__}: {e}"
            records.append(record)
            return records
        record["e2e_s"] = time.perf_counter() - started
        records.append(record)
        messages += [
            {"role": "assistant", "content": "".join(answer)},
            {"role": "user", "content": extras[turn - 1]},
        ]
    return records


# what SmolLM2's chat template adds around a lone user message (its system prompt, tags)
TEMPLATE_TOKENS = 30


async def _cold_probes(
    client, model: str, config: ClientConfig, texts: list[str]
) -> list[dict[str, Any]]:
    """One fresh prompt per text, one after the other (each alone on the server, as the
    sessions' last turns were not): TTFT without a stored prefix but the system prompt."""
    records = []
    for i, text in enumerate(texts):
        started = time.perf_counter()
        record: dict[str, Any] = {"session": i, "turn": "cold", "ttft_s": None, "error": None}
        try:
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": text}],
                max_tokens=1,
                temperature=config.temperature,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers={"X-Session-Id": f"cold-{i}-{time.monotonic_ns()}"},
            )
            async with stream:
                async for chunk in stream:
                    if chunk.usage is not None:
                        record["prompt_tokens"] = chunk.usage.prompt_tokens
                    if record["ttft_s"] is None and chunk.choices:
                        record["ttft_s"] = time.perf_counter() - started
        except Exception as e:
            record["error"] = f"{type(e).__name__}: {e}"
        records.append(record)
    return records


def _per_turn(records: list[dict[str, Any]], turns: int) -> dict[str, dict[str, Any]]:
    out = {}
    for turn in range(1, turns + 1):
        ok = [r for r in records if r["turn"] == turn and r["error"] is None and r["ttft_s"]]
        ttfts = [r["ttft_s"] * 1000 for r in ok]
        prompts = [r.get("prompt_tokens", 0) for r in ok]
        out[str(turn)] = {
            "completed": len(ok),
            "failed": sum(1 for r in records if r["turn"] == turn and r["error"] is not None),
            "prompt_tokens_mean": statistics.fmean(prompts) if prompts else None,
            "ttft_ms": {
                "mean": statistics.fmean(ttfts) if ttfts else None,
                "p50": percentile(ttfts, 50) if ttfts else None,
                "p95": percentile(ttfts, 95) if ttfts else None,
            },
        }
    return out


async def _run(args: argparse.Namespace, config: ClientConfig, texts: list[str]) -> dict:
    client = make_client(config)
    model = args.model or await resolve_model(client)
    per = args.turns - 1
    firsts = texts[: args.sessions]
    extras = texts[args.sessions :]
    sessions = [
        _session(
            client, model, config, i, firsts[i], extras[i * per : (i + 1) * per] + [""], args.turns
        )
        for i in range(args.sessions)
    ]
    started = time.perf_counter()
    results = await asyncio.gather(*sessions)
    records = [r for rs in results for r in rs]
    return {
        "mode": "multi_turn",
        "base_url": args.base_url,
        "model": model,
        "sessions": args.sessions,
        "turns": args.turns,
        "input_len": args.input_len,
        "turn_len": args.turn_len,
        "output_len": args.output_len,
        "duration_s": time.perf_counter() - started,
        "per_turn": _per_turn(records, args.turns),
        "records": records,
    }


def run(args: argparse.Namespace) -> int:
    counter = load_token_counter(args.tokenizer)
    text = read_source_text(args.prompts_file)
    firsts = build_prompts(text, counter, args.sessions, args.input_len, args.seed)
    extras = build_prompts(
        text, counter, args.sessions * max(1, args.turns - 1), args.turn_len, args.seed + 1
    )
    config = ClientConfig(
        base_url=args.base_url,
        api_key=resolve_api_key(args.api_key),
        max_tokens=args.output_len,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        timeout_s=args.timeout_s,
    )
    print(
        f"multi-turn bench: {args.sessions} sessions x {args.turns} turns, first turn "
        f"{args.input_len} tokens, +{args.turn_len} per turn, {args.output_len} out",
        flush=True,
    )
    summary = asyncio.run(_run(args, config, [p.text for p in firsts + extras]))
    if args.cold_probe:
        last = summary["per_turn"][str(args.turns)]
        cold_len = max(16, round(last["prompt_tokens_mean"] or args.input_len) - TEMPLATE_TOKENS)
        probes = build_prompts(text, counter, args.sessions, cold_len, args.seed + 7)
        records = asyncio.run(_cold_probe_run(config, args, [p.text for p in probes]))
        summary["records"] += records
        # the probes' row, in the same form as a turn's
        cold = _per_turn([{**r, "turn": 1} for r in records], 1)["1"]
        summary["per_turn"]["cold"] = cold
        warm = last["ttft_ms"]["p50"]
        cold_p50 = summary["per_turn"]["cold"]["ttft_ms"]["p50"]
        if warm and cold_p50:
            summary["cold_over_warm_ttft_p50"] = cold_p50 / warm
            print(
                f"cold prompt of the last turn's length: TTFT p50 {cold_p50:.0f} ms, "
                f"{cold_p50 / warm:.1f}x the warm turn {args.turns}'s"
            )
    for turn, row in summary["per_turn"].items():
        t = row["ttft_ms"]
        p50 = f"{t['p50']:.0f}" if t["p50"] is not None else "-"
        print(
            f"turn {turn}: prompt ~{row['prompt_tokens_mean'] or 0:.0f} tokens, "
            f"TTFT p50 {p50} ms, completed {row['completed']}, failed {row['failed']}"
        )
    path = Path(args.output_json or f"results/multiturn_{time.strftime('%Y%m%d-%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
    print(f"wrote {path}")
    if not args.no_plot:
        png = Path(args.plot) if args.plot else path.with_suffix(".png")
        plot_turns([summary], [args.base_url], png)
        print(f"wrote {png}")
    return 0 if all(r["completed"] for r in summary["per_turn"].values()) else 1


async def _cold_probe_run(
    config: ClientConfig, args: argparse.Namespace, texts: list[str]
) -> list[dict[str, Any]]:
    client = make_client(config)
    model = args.model or await resolve_model(client)
    return await _cold_probes(client, model, config, texts)


def plot_turns(summaries: list[dict], labels: list[str], path: Path) -> None:
    """TTFT p50 per turn, one bar group per summary (e.g. reuse on vs off)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = sorted({int(t) for s in summaries for t in s["per_turn"] if t != "cold"})
    width = 0.8 / len(summaries)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (s, label) in enumerate(zip(summaries, labels, strict=True)):
        values = [s["per_turn"][str(t)]["ttft_ms"]["p50"] or 0 for t in turns]
        xs = [t + (i - (len(summaries) - 1) / 2) * width for t in turns]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(turns)
    ax.set_xlabel("turn")
    ax.set_ylabel("TTFT p50 (ms)")
    ax.set_title(f"multi-turn chat: {summaries[0]['sessions']} sessions")
    ax.set_ylim(top=ax.get_ylim()[1] * 1.25)  # room for the legend above the bars
    ax.legend(loc="upper left", ncols=len(summaries))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
