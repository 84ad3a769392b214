"""Soak test of a running server (issue 14): a long stretch at ~80 % of its measured capacity
with valid, invalid and disconnecting clients mixed; what drifts over time is the result.

    .venv/bin/inferos serve &                                  # make serve's defaults
    .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:8000 --minutes 30 \
        --out-dir benchmarks/results/DATE/soak

1. Capacity: `--concurrency` closed-loop streams of `--input-len`/`--output-len` for
   `--capacity-s` seconds give requests/s at saturation.
2. Soak: Poisson arrivals at `--load` x that rate for `--minutes`. Each arrival is valid
   (streamed, or not), invalid (a malformed body, an unsupported field, an out-of-vocabulary
   token id, an oversized body) or a client that disconnects after a few chunks.
3. Every `--sample-s`: RSS of every server process (the `inferos serve` process and its Ray
   workers, found by their command lines), the KV store's disk bytes from /metrics, the
   window's latency p50/p99 and its outcomes.

Writes soak.json (samples + summary: error rate of valid requests, 5xx count, RSS growth
per process, p99 drift, disk) and soak.png. Progress is printed once per sample.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from serving.bench.prompts import build_prompts, load_token_counter, read_source_text
from serving.bench.report import percentile
from serving.telemetry import Snapshot

MIX = {"valid_stream": 0.55, "valid_plain": 0.2, "invalid": 0.15, "disconnect": 0.1}
INVALID_BODIES = [
    b'{"model": "m", "prompt": ',  # malformed JSON
    b'{"prompt": "hi", "max_tokens": 4, "logprobs": 3}',  # unsupported field
    b'{"prompt": "hi", "max_tokens": 4, "stop_token_ids": [1000000000], "min_tokens": 2}',
    b'{"prompt": "hi", "max_tokens": -1}',
]
OVERSIZED = b'{"prompt": "' + b"x" * (2 << 20) + b'"}'
SERVER_PROCESS = re.compile(r"ray::|inferos serve|gcs_server|raylet|dashboard|runtime_env")


@dataclass
class Window:
    latencies_s: list[float] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)


def server_processes() -> dict[str, psutil.Process]:
    """Name → process for every process of the server (Ray workers by their actor name)."""
    found: dict[str, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline", "name"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if SERVER_PROCESS.search(cmd) or p.info["name"] in ("gcs_server", "raylet"):
            name = (p.info["cmdline"] or [p.info["name"]])[0].split("/")[-1][:60]
            found[f"{name} [{p.pid}]"] = p
    return found


def rss_mb(procs: dict[str, psutil.Process]) -> dict[str, float]:
    out = {}
    for name, p in procs.items():
        try:
            out[name] = p.memory_info().rss / 2**20
        except psutil.Error:
            out[name] = float("nan")  # died: shows as a gap
    return out


class Soak:
    def __init__(self, args: argparse.Namespace, prompts: list[str], model: str) -> None:
        self.args, self.prompts, self.model = args, prompts, model
        self.window = Window()
        self.totals: Counter = Counter()
        self.rng = random.Random(args.seed)
        self.tasks: set[asyncio.Task] = set()

    def _prompt(self) -> str:
        return self.rng.choice(self.prompts)

    async def valid(self, http: httpx.AsyncClient, stream: bool, disconnect_after: int = 0) -> None:
        body = {"model": self.model, "prompt": self._prompt(), "max_tokens": self.args.output_len,
                "ignore_eos": True, "stream": stream}  # fmt: skip
        started = time.perf_counter()
        kind = "disconnect" if disconnect_after else ("valid_stream" if stream else "valid_plain")
        try:
            if stream:
                async with http.stream("POST", "/v1/completions", json=body) as resp:
                    status = resp.status_code
                    chunks = 0
                    async for line in resp.aiter_lines():
                        if line.startswith("data: {") and '"error"' in line:
                            status = json.loads(line[6:])["error"]["code"]
                            break
                        chunks += 1
                        if disconnect_after and chunks >= disconnect_after:
                            break  # closing the stream is the client going away
            else:
                status = (await http.post("/v1/completions", json=body)).status_code
        except httpx.HTTPError as e:
            status = type(e).__name__
        if not disconnect_after and status == 200:
            self.window.latencies_s.append(time.perf_counter() - started)
        self._count(kind, status)

    async def invalid(self, http: httpx.AsyncClient) -> None:
        raw = OVERSIZED if self.rng.random() < 0.1 else self.rng.choice(INVALID_BODIES)
        try:
            resp = await http.post(
                "/v1/completions", content=raw, headers={"content-type": "application/json"}
            )
            status = resp.status_code
        except httpx.HTTPError as e:
            status = type(e).__name__
        self._count("invalid", status)

    def _count(self, kind: str, status: int | str) -> None:
        if kind == "invalid":
            outcome = "ok_4xx" if isinstance(status, int) and 400 <= status < 500 else "bad"
        elif kind == "disconnect":
            outcome = "ok" if status == 200 else "bad"
        else:
            outcome = "ok" if status == 200 else ("rejected_429" if status == 429 else "bad")
        server_error = isinstance(status, int) and status >= 500
        key = f"{kind}:{outcome}" + (":5xx" if server_error else "")
        self.window.outcomes[key] += 1
        self.totals[key] += 1

    def launch(self, http: httpx.AsyncClient) -> None:
        kind = self.rng.choices(list(MIX), weights=list(MIX.values()))[0]
        if kind == "invalid":
            coro = self.invalid(http)
        elif kind == "disconnect":
            coro = self.valid(http, stream=True, disconnect_after=self.rng.randint(1, 5))
        else:
            coro = self.valid(http, stream=kind == "valid_stream")
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


async def capacity(args: argparse.Namespace, prompts: list[str], model: str) -> float:
    """Requests/s at saturation: `concurrency` closed-loop streams for `capacity_s`."""
    done = 0
    deadline = time.perf_counter() + args.capacity_s
    body = {"model": model, "max_tokens": args.output_len, "ignore_eos": True}

    async def loop(http: httpx.AsyncClient, i: int) -> None:
        nonlocal done
        k = i
        while time.perf_counter() < deadline:
            resp = await http.post(
                "/v1/completions", json=body | {"prompt": prompts[k % len(prompts)]}
            )
            resp.raise_for_status()
            done += 1
            k += args.concurrency

    async with httpx.AsyncClient(base_url=args.url, timeout=600) as http:
        started = time.perf_counter()
        await asyncio.gather(*(loop(http, i) for i in range(args.concurrency)))
    return done / (time.perf_counter() - started)


async def soak(args: argparse.Namespace, prompts: list[str], model: str, rate: float) -> list[dict]:
    runner = Soak(args, prompts, model)
    procs = server_processes()
    samples: list[dict] = []
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=args.url, timeout=600, limits=limits) as http:
        started = time.perf_counter()
        end = started + args.minutes * 60
        next_sample = started + args.sample_s
        next_arrival = started
        while time.perf_counter() < end:
            now = time.perf_counter()
            while next_arrival <= now:
                runner.launch(http)
                next_arrival += runner.rng.expovariate(rate)
            if now >= next_sample:
                samples.append(await sample(http, runner, procs, now - started))
                next_sample += args.sample_s
            await asyncio.sleep(min(next_arrival, next_sample) - time.perf_counter())
        await asyncio.gather(*list(runner.tasks), return_exceptions=True)
        samples.append(await sample(http, runner, procs, time.perf_counter() - started))
    return samples


async def sample(http: httpx.AsyncClient, runner: Soak, procs: dict, t: float) -> dict:
    window, runner.window = runner.window, Window()
    try:
        text = (await http.get("/metrics", timeout=30)).text
        disk = Snapshot.parse(text, t).total("kv_store_disk_bytes")
        healthy = (await http.get("/health", timeout=30)).status_code == 200
    except httpx.HTTPError:
        disk, healthy = float("nan"), False
    lat = window.latencies_s
    row = {
        "t_s": round(t, 1),
        "healthy": healthy,
        "in_flight": len(runner.tasks),
        "p50_s": percentile(lat, 50) if lat else None,
        "p99_s": percentile(lat, 99) if lat else None,
        "outcomes": dict(window.outcomes),
        "kv_store_disk_bytes": disk,
        "rss_mb": rss_mb(procs),
    }
    bad = sum(v for k, v in window.outcomes.items() if ":bad" in k)
    print(
        f"[{t / 60:5.1f} min] in flight {row['in_flight']:3d}  "
        f"p50 {row['p50_s'] or 0:.2f} s  p99 {row['p99_s'] or 0:.2f} s  "
        f"requests {sum(window.outcomes.values())}  bad {bad}  healthy {healthy}  "
        f"rss total {sum(v for v in row['rss_mb'].values() if v == v):.0f} MB",
        flush=True,
    )
    return row


def summarize(samples: list[dict], rate: float, capacity_rps: float, args) -> dict:
    totals: Counter = Counter()
    for s in samples:
        totals.update(s["outcomes"])
    valid = sum(v for k, v in totals.items() if k.startswith("valid_"))
    valid_bad = sum(v for k, v in totals.items() if k.startswith("valid_") and ":bad" in k)
    growth = {}
    series = defaultdict(list)
    for s in samples:
        for name, mb in s["rss_mb"].items():
            series[name].append(mb)
    for name, values in series.items():
        finite = [v for v in values if v == v]
        if finite:
            # after the first tenth (warm-up: caches, compiled kernels) to the end
            base = finite[min(len(finite) - 1, max(1, len(finite) // 10))]
            growth[name] = {"start_mb": round(base, 1), "end_mb": round(finite[-1], 1),
                            "growth_mb": round(finite[-1] - base, 1)}  # fmt: skip
    p99 = [s["p99_s"] for s in samples if s["p99_s"] is not None]
    tenth = max(1, len(p99) // 10)
    return {
        "capacity_rps": capacity_rps,
        "offered_rps": rate,
        "minutes": args.minutes,
        "outcomes": dict(totals),
        "valid_requests": valid,
        "valid_error_rate": valid_bad / valid if valid else None,
        "server_5xx": sum(v for k, v in totals.items() if k.endswith(":5xx")),
        "unhealthy_samples": sum(not s["healthy"] for s in samples),
        "rss_growth": growth,
        "p99_first_tenth_s": sum(p99[:tenth]) / tenth if p99 else None,
        "p99_last_tenth_s": sum(p99[-tenth:]) / tenth if p99 else None,
        "kv_store_disk_bytes_max": max(
            (
                s["kv_store_disk_bytes"]
                for s in samples
                if s["kv_store_disk_bytes"] == s["kv_store_disk_bytes"]
            ),
            default=None,
        ),
    }


def plot(samples: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t_s"] / 60 for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    names = sorted({n for s in samples for n in s["rss_mb"]})
    for name in names:
        axes[0].plot(t, [s["rss_mb"].get(name, float("nan")) for s in samples], label=name)
    axes[0].set_ylabel("RSS (MB)")
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].plot(t, [s["p50_s"] for s in samples], label="p50")
    axes[1].plot(t, [s["p99_s"] for s in samples], label="p99")
    axes[1].set_ylabel("request latency (s)")
    axes[1].legend()
    bad = [sum(v for k, v in s["outcomes"].items() if ":bad" in k) for s in samples]
    total = [sum(s["outcomes"].values()) for s in samples]
    axes[2].plot(t, total, label="requests per sample")
    axes[2].plot(t, bad, label="failed (not a 4xx for an invalid one)")
    axes[2].plot(
        t, [s["kv_store_disk_bytes"] / 2**20 for s in samples], label="KV store disk (MiB)"
    )
    axes[2].set_xlabel("minutes")
    axes[2].legend()
    fig.suptitle("soak: RSS per process, latency, outcomes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--load", type=float, default=0.8, help="fraction of measured capacity")
    p.add_argument("--capacity-s", type=float, default=60)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--sample-s", type=float, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, required=True)
    args = p.parse_args()
    counter = load_token_counter(None)
    prompts = [
        pr.text
        for pr in build_prompts(read_source_text(None), counter, 256, args.input_len, args.seed)
    ]
    print(f"measuring capacity: {args.concurrency} streams for {args.capacity_s:.0f} s", flush=True)
    capacity_rps = asyncio.run(capacity(args, prompts, args.model))
    rate = args.load * capacity_rps
    print(
        f"capacity {capacity_rps:.2f} req/s; soaking at {rate:.2f} req/s for {args.minutes} min",
        flush=True,
    )
    samples = asyncio.run(soak(args, prompts, args.model, rate))
    summary = summarize(samples, rate, capacity_rps, args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "soak.json").write_text(
        json.dumps({"summary": summary, "samples": samples}, indent=1)
    )
    plot(samples, args.out_dir / "soak.png")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
