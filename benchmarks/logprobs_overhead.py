"""What logprobs cost: output tokens/s at each concurrency with and without logprobs, on one
server, runs interleaved (on, off, off, on, ...) so a shared machine's drift hits both.

    PYTHONPATH=. .venv/bin/python benchmarks/logprobs_overhead.py --out results/logprobs

Starts `inferos serve` (product defaults; --serve-args to change them), then per repeat and
concurrency runs `inferos bench` (completions, ignore_eos) once with `--extra-body
'{"logprobs": 5}'` and once without; prints one line per run and a summary of the on/off
ratios (median per concurrency), and writes everything to OUT/logprobs_overhead.json.

On a shared, oversubscribed box wall-clock tokens/s drifts run to run; the CPU time each
run took, per output token, drifts much less: the server's process tree (ingress, decode,
Ray) and the bench client (which parses the bigger chunks) are reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent / "inferos"


def wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"{url} not healthy after {timeout_s:.0f} s")


def tree_cpu_s(root: psutil.Process) -> dict[int, float]:
    """CPU seconds (user + system) so far of `root` and every descendant, by pid."""
    out = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            out[proc.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def bench(args, url: str, c: int, extra_body: dict | None, out: Path) -> dict:
    cmd = [str(BIN), "bench", "--base-url", url, "--concurrency", str(c)]
    cmd += ["--num-prompts", str(max(args.min_prompts, c * args.prompts_per_client))]
    cmd += ["--input-len", str(args.input_len), "--output-len", str(args.output_len)]
    cmd += ["--seed", str(args.seed), "--no-plot", "--no-progress", "--output-json", str(out)]
    if extra_body:
        cmd += ["--extra-body", json.dumps(extra_body)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def overhead_parser(doc: str, default_out: str) -> argparse.ArgumentParser:
    """The options every on/off overhead benchmark shares."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(default_out))
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--serve-args", default="", help="extra `inferos serve` arguments")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3, help="on/off pairs per concurrency")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--prompts-per-client", type=int, default=4)
    p.add_argument("--min-prompts", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    return p


def main() -> int:
    p = overhead_parser(__doc__, "results/logprobs_overhead")
    p.add_argument("--num-logprobs", type=int, default=5)
    args = p.parse_args()
    run_overhead(args, {"logprobs": args.num_logprobs}, "logprobs")
    return 0


def run_overhead(args: argparse.Namespace, extra_on: dict, feature: str) -> dict:
    """Interleaved runs with `extra_on` in every request's body (on) and without (off);
    prints and writes OUT/{feature}_overhead.json; returns the summary."""
    args.out.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{args.port}"
    print(f"config: {json.dumps({k: str(v) for k, v in vars(args).items()})}", flush=True)
    cmd = [str(BIN), "serve", "--host", "127.0.0.1", "--port", str(args.port)]
    cmd += shlex.split(args.serve_args)
    log = (args.out / "server.log").open("w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    root = psutil.Process(server.pid)
    runs: list[dict] = []
    try:
        wait_healthy(url, 900)
        bench(args, url, 1, False, args.out / "warmup.json")
        for rep in range(args.repeats):
            for c in args.concurrency:
                # alternate which goes first, so neither always runs on a warmer/cooler box
                for on in (True, False) if rep % 2 == 0 else (False, True):
                    name = f"c{c}_{'on' if on else 'off'}_{rep}.json"
                    load = os.getloadavg()[0]
                    before, client_before = tree_cpu_s(root), children_cpu_s()
                    r = bench(args, url, c, extra_on if on else None, args.out / name)
                    after, client_s = tree_cpu_s(root), children_cpu_s() - client_before
                    server_s = sum(t - before.get(pid, 0.0) for pid, t in after.items())
                    tokens = max(1, r["total_output_tokens"])
                    runs.append(
                        {"c": c, feature: on, "repeat": rep, "loadavg_1m": load}
                        | {k: r[k] for k in ("output_tokens_per_s", "completed", "failed")}
                        | {"tpot_p50_ms": r["tpot_ms"].get("p50") if r["tpot_ms"] else None}
                        | {"server_cpu_ms_per_token": 1000 * server_s / tokens}
                        | {"client_cpu_ms_per_token": 1000 * client_s / tokens}
                    )
                    print(json.dumps(runs[-1]), flush=True)
    finally:
        os.killpg(server.pid, signal.SIGINT)  # `inferos serve` stops its Ray cluster
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    summary = {}
    for c in args.concurrency:
        ratios = []
        for rep in range(args.repeats):
            on, off = (
                next(r for r in runs if (r["c"], r[feature], r["repeat"]) == (c, x, rep))
                for x in (True, False)
            )
            ratios.append(on["output_tokens_per_s"] / off["output_tokens_per_s"])
        tps = {
            x: statistics.median(
                r["output_tokens_per_s"] for r in runs if r["c"] == c and r[feature] == x
            )
            for x in (True, False)
        }
        cpu = {
            (x, who): statistics.median(
                r[f"{who}_cpu_ms_per_token"] for r in runs if r["c"] == c and r[feature] == x
            )
            for x in (True, False)
            for who in ("server", "client")
        }
        summary[f"c{c}"] = {
            "on_tok_s_median": tps[True],
            "off_tok_s_median": tps[False],
            "on_off_ratios": ratios,
            "on_off_ratio_median": statistics.median(ratios),
            "server_cpu_ms_per_token_on_off": [cpu[True, "server"], cpu[False, "server"]],
            "client_cpu_ms_per_token_on_off": [cpu[True, "client"], cpu[False, "client"]],
        }
    print(json.dumps(summary, indent=1))
    (args.out / f"{feature}_overhead.json").write_text(
        json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "runs": runs}
                   | {"summary": summary}, indent=1) + "\n"
    )  # fmt: skip
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
