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
    client,
    model: str,
    config: ClientConfig,
    sid: int,
    first: str,
    extras: list[str],
    turns: int,
    round_index: int = 0,
) -> list[dict[str, Any]]:
    messages: list[dict[str, str]] = [{"role": "user", "content": first}]
    records = []
    for turn in range(1, turns + 1):
        started = time.perf_counter()
        record: dict[str, Any] = {
            "round": round_index,
            "session": sid,
            "turn": turn,
            "ttft_s": None,
            "error": None,
        }
        answer = []
        try:
            stream = await client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=config.max_tokens,
                temperature=config.temperature,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers={"X-Session-Id": f"bench-r{round_index}-{sid}"},
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


async def _run(
    args: argparse.Namespace, config: ClientConfig, texts: list[str], round_index: int = 0
) -> dict:
    # closed in the loop that made it (each round runs its own loop: an unclosed client's
    # connections are closed later by the garbage collector, on a loop that is gone)
    async with make_client(config) as client:
        model = args.model or await resolve_model(client)
        per = args.turns - 1
        firsts = texts[: args.sessions]
        extras = texts[args.sessions :]
        sessions = [
            _session(
                client,
                model,
                config,
                i,
                firsts[i],
                extras[i * per : (i + 1) * per] + [""],
                args.turns,
                round_index,
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
    config = ClientConfig(
        base_url=args.base_url,
        api_key=resolve_api_key(args.api_key),
        max_tokens=args.output_len,
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        timeout_s=args.timeout_s,
    )
    print(
        f"multi-turn bench: {args.rounds} round(s) of {args.sessions} sessions x {args.turns} "
        f"turns, first turn {args.input_len} tokens, +{args.turn_len} per turn, "
        f"{args.output_len} out",
        flush=True,
    )
    rounds = []
    for i in range(args.rounds):
        # each round its own texts and session ids: no conversation of one round starts
        # like one of another, so no round finds an earlier round's turns cached
        summary = _one_round(args, config, counter, text, args.seed + ROUND_SEED_STEP * i, i)
        rounds.append(summary)
        if args.rounds > 1:
            print(f"round {i + 1}/{args.rounds}: {_round_line(summary, args.turns)}", flush=True)
    summary = rounds[0] if args.rounds == 1 else pool_rounds(rounds, args.turns)
    _print_summary(summary, args.turns)
    path = Path(args.output_json or f"results/multiturn_{time.strftime('%Y%m%d-%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
    print(f"wrote {path}")
    if not args.no_plot:
        png = Path(args.plot) if args.plot else path.with_suffix(".png")
        plot_turns([summary], [args.base_url], png)
        print(f"wrote {png}")
    return 0 if all(r["completed"] for r in summary["per_turn"].values()) else 1


# seeds of successive rounds: a round draws its texts with seed, seed + 1 and seed + 7, so
# rounds this far apart never share a seed
ROUND_SEED_STEP = 1000


def _one_round(
    args: argparse.Namespace, config: ClientConfig, counter, text: str, seed: int, index: int
) -> dict:
    firsts = build_prompts(text, counter, args.sessions, args.input_len, seed)
    extras = build_prompts(
        text, counter, args.sessions * max(1, args.turns - 1), args.turn_len, seed + 1
    )
    summary = asyncio.run(_run(args, config, [p.text for p in firsts + extras], index))
    summary["seed"] = seed
    if args.cold_probe:
        last = summary["per_turn"][str(args.turns)]
        cold_len = max(16, round(last["prompt_tokens_mean"] or args.input_len) - TEMPLATE_TOKENS)
        probes = build_prompts(text, counter, args.sessions, cold_len, seed + 7)
        records = asyncio.run(_cold_probe_run(config, args, [p.text for p in probes]))
        summary["records"] += [{**r, "round": index} for r in records]
        _add_cold_row(summary, records, args.turns)
    return summary


def _add_cold_row(summary: dict, cold_records: list[dict[str, Any]], turns: int) -> None:
    """The cold probes' row, in the same form as a turn's, and cold p50 / last turn's p50."""
    summary["per_turn"]["cold"] = _per_turn([{**r, "turn": 1} for r in cold_records], 1)["1"]
    warm = summary["per_turn"][str(turns)]["ttft_ms"]["p50"]
    cold = summary["per_turn"]["cold"]["ttft_ms"]["p50"]
    if warm and cold:
        summary["cold_over_warm_ttft_p50"] = cold / warm


def pool_rounds(rounds: list[dict], turns: int) -> dict:
    """One summary of several rounds: each turn's TTFT percentiles over every round's
    records (and the cold probes'), the ratio of the pooled p50s, and each round's own
    ratio, so a reader sees the spread a single round hides."""
    records = [r for s in rounds for r in s["records"]]
    shared = (
        "mode",
        "base_url",
        "model",
        "sessions",
        "turns",
        "input_len",
        "turn_len",
        "output_len",
    )
    pooled = {key: rounds[0][key] for key in shared} | {"rounds": len(rounds)}
    pooled["duration_s"] = sum(s["duration_s"] for s in rounds)
    pooled["per_turn"] = _per_turn(records, turns)  # counts turns 1..turns: not the probes
    cold = [r for r in records if r["turn"] == "cold"]
    if cold:
        _add_cold_row(pooled, cold, turns)
        ratios = [s.get("cold_over_warm_ttft_p50") for s in rounds]
        pooled["cold_over_warm_per_round"] = ratios
        known = [r for r in ratios if r is not None]
        if known:
            pooled["cold_over_warm_median_of_rounds"] = statistics.median(known)
    pooled["per_round"] = [{"seed": s.get("seed"), "per_turn": s["per_turn"]} for s in rounds]
    pooled["records"] = records
    return pooled


def _round_line(summary: dict, turns: int) -> str:
    last = summary["per_turn"][str(turns)]["ttft_ms"]["p50"]
    line = f"turn {turns} TTFT p50 {last:.0f} ms" if last is not None else f"turn {turns} failed"
    ratio = summary.get("cold_over_warm_ttft_p50")
    if ratio is not None:
        cold = summary["per_turn"]["cold"]["ttft_ms"]["p50"]
        line += f", cold {cold:.0f} ms ({ratio:.1f}x)"
    return line


def _print_summary(summary: dict, turns: int) -> None:
    ratio = summary.get("cold_over_warm_ttft_p50")
    if ratio is not None:
        cold = summary["per_turn"]["cold"]["ttft_ms"]["p50"]
        print(
            f"cold prompt of the last turn's length: TTFT p50 {cold:.0f} ms, "
            f"{ratio:.1f}x the warm turn {turns}'s"
        )
    per_round = summary.get("cold_over_warm_per_round")
    if per_round:
        shown = ", ".join(f"{r:.1f}" if r is not None else "-" for r in per_round)
        print(
            f"cold / warm per round: {shown} "
            f"(median {summary.get('cold_over_warm_median_of_rounds', float('nan')):.1f}x)"
        )
    for turn, row in summary["per_turn"].items():
        t = row["ttft_ms"]
        p50 = f"{t['p50']:.0f}" if t["p50"] is not None else "-"
        print(
            f"turn {turn}: prompt ~{row['prompt_tokens_mean'] or 0:.0f} tokens, "
            f"TTFT p50 {p50} ms, completed {row['completed']}, failed {row['failed']}"
        )


async def _cold_probe_run(
    config: ClientConfig, args: argparse.Namespace, texts: list[str]
) -> list[dict[str, Any]]:
    async with make_client(config) as client:
        model = args.model or await resolve_model(client)
        return await _cold_probes(client, model, config, texts)


def plot_turns(summaries: list[dict], labels: list[str], path: Path) -> None:
    """TTFT p50 per turn, one bar group per summary (e.g. reuse on vs off), and the cold
    prompt of the last turn's length as a last group where it was probed: the comparison
    the warm turns are there for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = sorted({int(t) for s in summaries for t in s["per_turn"] if t != "cold"})
    cold_x = max(turns) + 1
    width = 0.8 / len(summaries)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (s, label) in enumerate(zip(summaries, labels, strict=True)):
        offset = (i - (len(summaries) - 1) / 2) * width  # this summary's bar in each group
        values = [s["per_turn"][str(t)]["ttft_ms"]["p50"] or 0 for t in turns]
        xs = [t + offset for t in turns]
        if "cold" in s["per_turn"]:
            values.append(s["per_turn"]["cold"]["ttft_ms"]["p50"] or 0)
            xs.append(cold_x + offset)
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    probed = any("cold" in s["per_turn"] for s in summaries)
    ticks = turns + ([cold_x] if probed else [])
    ax.set_xticks(ticks, [str(t) for t in turns] + (["cold,\nsame length"] if probed else []))
    ax.set_xlabel("turn")
    ax.set_ylabel("TTFT p50 (ms)")
    sessions = summaries[0]["sessions"]
    title = f"multi-turn chat: {sessions} session{'s' if sessions != 1 else ''}"
    ratio = summaries[0].get("cold_over_warm_ttft_p50")
    if ratio is not None:
        title += f"; cold / warm turn {max(turns)}: {ratio:.1f}x"
    rounds = summaries[0].get("rounds", 1)
    if rounds > 1:
        title += f" (pooled over {rounds} rounds)"
    ax.set_title(title, fontsize=10)
    ax.set_ylim(top=ax.get_ylim()[1] * 1.25)  # room for the legend above the bars
    ax.legend(loc="upper left", ncols=len(summaries))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
