"""Peer serving benchmark: our server, vLLM and (optionally) llama-server, one after the other,
each measured by vLLM's own client, `vllm bench serve` from .venv-vllm.

For each server in turn (ours, then vLLM, then llama-server): the server is started by this
script (or taken from a URL), waited on until GET /v1/models and /health answer, warmed up with
a few uncounted requests, then loaded at each --concurrency level, one level after the other, with

    .venv-vllm/bin/vllm bench serve --backend openai --base-url URL --endpoint /v1/completions
        --model SmolLM2-135M-Instruct --tokenizer $INFEROS_HOME/models/SmolLM2-135M-Instruct
        --dataset-name random --random-input-len 128 --random-output-len 128 --ignore-eos
        --temperature 0 --max-concurrency C --num-prompts N --seed 0 --save-result ...

with N = max(--min-prompts, C x --prompts-per-client). With --rounds R, all of that R times,
the servers' order reversed every other round (benchmarks/peer_rounds.py): the tables give
medians over rounds and ratios paired within a round, so that the VM's drift of speed over
minutes does not pass for a difference between servers. A server this script started is stopped
(its whole session, Ray workers included) before the next one starts, so no two servers ever
share the CPU.

Memory: while a server runs, the summed VmRSS of its processes is sampled every
--mem-interval-s. For a server this script started: every process in its session (os.getsid)
plus the started process's descendants (Ray's raylet and workers change their process group
but keep the session). For a server given by URL: the process listening on the URL's port is
found through /proc, and the tree of its topmost ancestor that is not also this script's (the
shell or job that started it) is taken. Summed RSS counts a shared page once per process that
maps it; the JSON also has the summed Pss at the end of each run.

Servers:
  ours   started as `.venv/bin/inferos serve --host 127.0.0.1 --port 8000 [--ours-args ...]`
         (`make serve`), or --ours-url URL of a running one, or --skip-ours
  vLLM   started as `PORT=8100 bash scripts/vllm_serve.sh [--vllm-args ...]` (`make vllm-serve`),
         or --vllm-url URL of a running one, or --skip-vllm
  llama  --llama-url URL of a running llama-server (never started by this script)

Writes into --out-dir (default benchmarks/results/<YYYY-MM-DD>/peers): peers.json (every raw
`vllm bench serve` result, memory samples, config, machine, versions), peers.md (one table and
the ours/peer ratios), peers.png (output tok/s and TTFT p50 vs concurrency; drawn with
.venv/bin/python when this interpreter has no matplotlib), raw/ (the client's result files) and
logs/ (server and client output).

Examples:
    make bench-peers                                  # the full sweep, c = 1 8 32 64
    .venv/bin/python benchmarks/peer_bench.py --ours-args "--pd-mode colocated"
    .venv/bin/python benchmarks/peer_bench.py --skip-ours --concurrency 1 --num-prompts 4
    .venv/bin/python benchmarks/peer_bench.py --ours-url http://127.0.0.1:8000 --skip-vllm \\
        --llama-url http://127.0.0.1:8080 --concurrency 1 8
    .venv/bin/python benchmarks/peer_bench.py --plot-from benchmarks/results/DATE/peers/peers.json

Ratios are ours / peer: above 1 is better for tok/s, below 1 is better for TTFT, TPOT and RSS.
Standard library only, so it runs under any python3 (the plot needs matplotlib somewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_vllm  # noqa: E402
import peer_rounds  # noqa: E402
from compare_vllm import (  # noqa: E402
    ROOT,
    ManagedServer,
    http_get_json,
    models_ready,
    models_url,
    port_open,
    server_root,
    tail,
)

VLLM_SERVE_SH = ROOT / "scripts" / "vllm_serve.sh"
DEFAULT_VLLM_VENV = ROOT / ".venv-vllm"
DEFAULT_OURS_BIN = ROOT / ".venv" / "bin" / "inferos"
PLOT_PYTHON = ROOT / ".venv" / "bin" / "python"
MODEL_NAME = "SmolLM2-135M-Instruct"
# The client is offline like the servers: no Hub look-ups, no usage stats.
CLIENT_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
LABELS = {"ours": "ours", "vllm": "vLLM", "llama": "llama-server"}
# (key in a `vllm bench serve` result, column label, digits)
COLUMNS: list[tuple[str, str, int]] = [
    ("output_throughput", "output tok/s", 1),
    ("median_ttft_ms", "TTFT p50 ms", 1),
    ("p99_ttft_ms", "TTFT p99 ms", 1),
    ("median_tpot_ms", "TPOT p50 ms", 2),
]


def log(msg: str) -> None:
    print(f"[peer_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


compare_vllm.log = log  # ManagedServer's progress lines carry this script's prefix


def default_model_dir() -> Path:
    home = os.environ.get("INFEROS_HOME") or os.path.expanduser("~/.cache/inferos")
    return Path(home) / "models" / MODEL_NAME


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# --------------------------------------------------------------------------- /proc


def proc_table() -> dict[int, tuple[int, int, int, str]]:
    """pid -> (ppid, session id, VmRSS KiB, name) for every process readable in /proc."""
    table: dict[int, tuple[int, int, int, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            ppid, sid = int(fields[1]), int(fields[3])
            rss = 0
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or a kernel thread
        table[pid] = (ppid, sid, rss, name)
    return table


def descendants(table: dict[int, tuple[int, int, int, str]], root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def members(table: dict[int, tuple[int, int, int, str]], root: int, sid: int | None) -> set[int]:
    """The server's processes: root's descendants, plus every process in session `sid`."""
    pids = descendants(table, root) if root in table else set()
    if sid is not None:
        pids |= {pid for pid, (_, s, _, _) in table.items() if s == sid}
    return pids


def server_root_pid(table: dict[int, tuple[int, int, int, str]], pid: int) -> int:
    """The topmost ancestor of `pid` that is not an ancestor of this script (nor init).

    For a server started elsewhere: the shell or job that started it, whose descendants are
    the server's processes (Ray's raylet and workers descend from our server's driver).
    """
    mine, p = set(), os.getpid()
    while p > 1 and p in table and p not in mine:
        mine.add(p)
        p = table[p][0]
    top = pid
    while top in table:
        parent = table[top][0]
        if parent <= 1 or parent in mine or parent not in table:
            break
        top = parent
    return top


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return shlex.join(a.decode(errors="replace") for a in f.read().split(b"\0") if a)
    except OSError:
        return "?"


def pss_kib(pids: set[int]) -> int | None:
    """Summed Pss (shared pages split between their users) from smaps_rollup, if readable."""
    total, seen = 0, False
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        seen = True
                        break
        except (OSError, ValueError):
            continue
    return total if seen else None


def listener_pid(port: int) -> int | None:
    """The pid owning a listening TCP socket on `port` (this user's processes only)."""
    inodes: set[str] = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(parts[9])
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    if not inodes:
        return None
    wanted = {f"socket:[{i}]" for i in inodes}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                try:
                    if os.readlink(fd.path) in wanted:
                        return int(entry.name)
                except OSError:
                    continue
        except OSError:
            continue
    return None


class MemorySampler:
    """Samples the summed VmRSS of a server's processes in a thread, every `interval_s`.

    mark() opens a window (one bench run); window() closes it: peak and last sum in the window.
    """

    def __init__(self, root: int, sid: int | None, interval_s: float):
        self.root, self.sid, self.interval_s = root, sid, interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.last_kib = 0
        self.last_nprocs = 0
        self.peak_kib = 0
        self._win_peak = 0
        self._win_samples = 0
        self._top: list[tuple[int, str, int]] = []

    def start(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    def sample(self) -> None:
        table = proc_table()
        pids = members(table, self.root, self.sid)
        total = sum(table[p][2] for p in pids)
        top = sorted(((p, table[p][3], table[p][2]) for p in pids), key=lambda t: -t[2])
        with self._lock:
            self.last_kib, self.last_nprocs, self._top = total, len(pids), top
            self.peak_kib = max(self.peak_kib, total)
            self._win_peak = max(self._win_peak, total)
            self._win_samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 (a failed sample must not end the bench)
                log(f"  memory sample failed: {e!r}")

    def mark(self) -> None:
        self.sample()
        with self._lock:
            self._win_peak, self._win_samples = self.last_kib, 1

    def window(self) -> dict[str, Any]:
        self.sample()
        with self._lock:
            top = self._top
            out = {
                "peak_rss_mib": round(self._win_peak / 1024, 1),
                "end_rss_mib": round(self.last_kib / 1024, 1),
                "nprocs": self.last_nprocs,
                "samples": self._win_samples,
            }
        pss = pss_kib({p for p, _, _ in top})
        out["end_pss_mib"] = None if pss is None else round(pss / 1024, 1)
        out["processes"] = [{"pid": p, "name": n, "rss_mib": round(r / 1024, 1)} for p, n, r in top]
        return out


# --------------------------------------------------------------------------- bench client


def num_prompts_for(c: int, args: argparse.Namespace) -> int:
    if args.num_prompts:
        return args.num_prompts
    return max(args.min_prompts, c * args.prompts_per_client)


def client_cmd(
    args: argparse.Namespace, base_url: str, c: int, n: int, output_len: int, raw: Path | None
) -> list[str]:
    cmd = [
        str(args.vllm_venv / "bin" / "vllm"),
        "bench",
        "serve",
        "--backend",
        "openai",
        "--base-url",
        server_root(base_url),
        "--endpoint",
        "/v1/completions",
        "--model",
        args.model_name,
        "--tokenizer",
        str(args.tokenizer),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(output_len),
        "--ignore-eos",
        "--temperature",
        str(args.temperature),
        "--max-concurrency",
        str(c),
        "--num-prompts",
        str(n),
        "--seed",
        str(args.seed),
        # The default is p99 only; p50 is also kept as median_*.
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,90,99",
        "--disable-tqdm",
    ]
    if raw is not None:
        cmd += ["--save-result", "--result-dir", str(raw.parent), "--result-filename", raw.name]
    return cmd + shlex.split(args.client_args)


def run_client(
    args: argparse.Namespace,
    base_url: str,
    c: int,
    n: int,
    output_len: int,
    raw: Path | None,
    log_path: Path,
    sampler: MemorySampler | None,
    tag: str,
) -> tuple[dict[str, Any] | None, float, list[str]]:
    """One `vllm bench serve` run; (its result JSON or None, elapsed s, command)."""
    cmd = client_cmd(args, base_url, c, n, output_len, raw)
    env = dict(os.environ, **CLIENT_ENV)
    if raw is not None:
        raw.unlink(missing_ok=True)
    t0 = time.monotonic()
    next_note = t0 + args.progress_every_s
    with open(log_path, "ab") as out:
        out.write(f"\n$ {shlex.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            while True:
                try:
                    code = proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    pass
                now = time.monotonic()
                if now - t0 > args.run_timeout_s:
                    log(f"  {tag}: client still running after {now - t0:.0f}s; killing it")
                    proc.kill()
                    code = proc.wait()
                    break
                if now >= next_note:
                    mem = f", RSS {sampler.last_kib / 1024:.0f} MiB" if sampler else ""
                    log(f"  {tag}: running, {now - t0:.0f}s elapsed{mem}")
                    next_note += args.progress_every_s
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    elapsed = time.monotonic() - t0
    if raw is None:
        return ({} if code == 0 else None), elapsed, cmd
    if code != 0 or not raw.exists():
        log(f"  {tag}: client failed (exit {code}); last lines of {log_path}:")
        print(tail(log_path, 15), flush=True)
        return None, elapsed, cmd
    return json.loads(raw.read_text()), elapsed, cmd


# --------------------------------------------------------------------------- servers


def stop_session(name: str, sid: int) -> list[int]:
    """After ManagedServer.stop(): end what is left of the session it started, by pid."""
    left: set[int] = set()
    for sig, wait_s in ((0, 15.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        table = proc_table()
        left = {p for p, (_, s, _, _) in table.items() if s == sid}
        if not left:
            return []
        if sig:
            log(f"  {name}: {len(left)} processes of its session outlived it; {sig.name}")
            for pid in left:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not any(s == sid for _, s, _, _ in proc_table().values()):
                return []
            time.sleep(0.5)
    return sorted(left)


def python_versions(python: Path, dists: list[str]) -> dict[str, str | None]:
    """Installed versions, read from package metadata (no import of the packages)."""
    if not python.exists():
        return {}
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {'python': sys.version.split()[0]}\n"
        f"for d in {dists!r}:\n"
        "    try: out[d] = m.version(d)\n"
        "    except m.PackageNotFoundError: out[d] = None\n"
        "print(json.dumps(out))"
    )
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}


def server_versions(name: str, base_url: str, args: argparse.Namespace) -> dict[str, Any]:
    if name == "ours":
        return python_versions(ROOT / ".venv" / "bin" / "python", ["inferos-serve", "torch", "ray"])
    if name == "vllm":
        out: dict[str, Any] = python_versions(args.vllm_venv / "bin" / "python", ["vllm", "torch"])
        try:
            out["server_version"] = http_get_json(server_root(base_url) + "/version").get("version")
        except (OSError, ValueError, AttributeError, urllib.error.URLError):
            pass
        return out
    try:  # llama-server: GET /props
        props = http_get_json(server_root(base_url) + "/props")
    except (OSError, ValueError, urllib.error.URLError):
        return {}
    keys = ("build_info", "model_path", "total_slots", "n_ctx")
    return {k: props.get(k) for k in keys if isinstance(props, dict) and k in props}


def bench_server(
    name: str,
    base_url: str,
    server: ManagedServer | None,
    args: argparse.Namespace,
    out_dir: Path,
    result: dict[str, Any],
    tag: str = "",
) -> None:
    """Fills `result` as it goes, so an interrupted server keeps the runs it finished.
    `tag` (a round's, e.g. "_r2") goes into the names of its client files."""
    label = LABELS[name]
    t_server = time.monotonic()
    sampler: MemorySampler | None = None
    sid: int | None = None
    try:
        if server is not None:
            if port_open(base_url):
                raise RuntimeError(
                    f"something already listens at {base_url}; stop it, or pass its URL "
                    f"(--{name}-url) to bench it as it is"
                )
            server.start()
            assert server.proc is not None
            root = sid = server.proc.pid  # start_new_session: its pid is its session id
            result["command"] = (
                server.cmd if isinstance(server.cmd, str) else shlex.join(server.cmd)
            )
            result["server_log"] = str(server.log_path)
            sampler = MemorySampler(root, sid, args.mem_interval_s).start()
            result["models"] = server.wait_ready(base_url, args.startup_timeout_s)
        else:
            ids = models_ready(base_url)
            if not ids:
                raise RuntimeError(f"nothing answers {models_url(base_url)}; start it first")
            result["models"] = ids
            log(f"{label}: using the running server at {base_url}, models {ids}")
            port = urlsplit(base_url).port or 80
            pid = listener_pid(port)
            if pid is None:
                log(f"  {label}: no readable process listens on port {port}: no memory samples")
            else:
                root = server_root_pid(proc_table(), pid)
                scope = {"listener_pid": pid, "root_pid": root, "root_cmd": cmdline(root)[:200]}
                log(
                    f"  {label}: port {port} is pid {pid}; RSS of pid {root} and its "
                    f"descendants ({scope['root_cmd'][:80]})"
                )
                result["memory_scope"] = scope
                sampler = MemorySampler(root, None, args.mem_interval_s).start()
        result["startup_s"] = round(time.monotonic() - t_server, 1)
        result["versions"] = server_versions(name, base_url, args)
        if sampler:
            log(
                f"{label}: RSS after start {sampler.last_kib / 1024:.0f} MiB "
                f"in {sampler.last_nprocs} processes"
            )
            result["memory_ready"] = sampler.window()
        client_log = out_dir / "logs" / f"{name}{tag}_client.log"
        if args.warmup_prompts > 0:
            warm_c = min(args.warmup_prompts, max(args.concurrency))
            log(
                f"{label}: warm-up, {args.warmup_prompts} prompts at concurrency {warm_c} "
                f"(discarded), load {loadavg()}"
            )
            ok, elapsed, _ = run_client(
                args,
                base_url,
                warm_c,
                args.warmup_prompts,
                min(32, args.output_len),
                None,
                client_log,
                sampler,
                f"{label} warm-up",
            )
            log(f"  {label}: warm-up {'done' if ok is not None else 'FAILED'} in {elapsed:.0f}s")
        for c in args.concurrency:
            n = num_prompts_for(c, args)
            before = loadavg()
            log(
                f"{label}: c={c}, {n} prompts, {args.input_len} in / {args.output_len} out; "
                f"load average before {before}; {time.monotonic() - t_server:.0f}s on this server"
            )
            if sampler:
                sampler.mark()
            raw = out_dir / "raw" / f"{name}{tag}_c{c}.json"
            res, elapsed, cmd = run_client(
                args, base_url, c, n, args.output_len, raw, client_log, sampler, f"{label} c={c}"
            )
            run: dict[str, Any] = {
                "num_prompts": n,
                "loadavg_before": before,
                "loadavg_after": loadavg(),
                "elapsed_s": round(elapsed, 1),
                "client_cmd": shlex.join(cmd),
                "memory": sampler.window() if sampler else None,
                "result": res,
            }
            result["runs"][str(c)] = run
            log("  " + summary_line(label, c, run))
    finally:
        if sampler:
            sampler.stop()
            if sampler.peak_kib:
                result["peak_rss_mib"] = round(sampler.peak_kib / 1024, 1)
        if server is not None:
            server.stop()
            if sid is not None:
                left = stop_session(label, sid)
                if left:
                    log(f"WARNING: {label}: pids {left} of its session are still alive")
                    result["left_over_pids"] = left
            if port_open(base_url):
                log(f"WARNING: {base_url} still accepts connections after stopping {label}")
    result["total_s"] = round(time.monotonic() - t_server, 1)


def summary_line(label: str, c: int, run: dict[str, Any]) -> str:
    res, mem = run.get("result"), run.get("memory") or {}
    if res is None:
        return f"{label} c={c}: FAILED ({run.get('elapsed_s')}s)"
    return (
        f"{label} c={c}: {fmt(res.get('output_throughput'))} out tok/s, "
        f"TTFT p50 {fmt(res.get('median_ttft_ms'))} / p99 {fmt(res.get('p99_ttft_ms'))} ms, "
        f"TPOT p50 {fmt(res.get('median_tpot_ms'), 2)} ms, "
        f"ok {res.get('completed')}/{run.get('num_prompts')}, "
        f"peak RSS {fmt(mem.get('peak_rss_mib'), 0)} MiB, {run.get('elapsed_s')}s"
    )


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "node": platform.node(),
        "machine": platform.machine(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    try:
        r = subprocess.run(["lscpu"], capture_output=True, text=True, check=False)
        for line in r.stdout.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "Thread(s) per core", "Socket(s)", "L3 cache"):
                info[key.strip().lower().replace("(s)", "s").replace(" ", "_")] = value.strip()
    except OSError:
        pass
    try:
        flags: set[str] = set()
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
                if line.startswith("model name") and "model_name" not in info:
                    info["model_name"] = line.split(":", 1)[1].strip()
        info["cpu_flags"] = {flag: flag in flags for flag in CPU_FLAGS}
        with open("/proc/meminfo") as f:
            info["mem_total_mib"] = round(int(f.readline().split()[1]) / 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        info["git_commit"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        pass
    info["runner_python"] = sys.version.split()[0]
    return info


# --------------------------------------------------------------------------- report


def fmt(value: Any, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def cell(report: dict[str, Any], name: str, c: int, key: str) -> float | None:
    """`name`'s number at level `c`: the median over the report's rounds (one round: its)."""
    return peer_rounds.median_value(report, name, c, key)


def server_names(report: dict[str, Any]) -> list[str]:
    """Every server of the report, in the first round's order."""
    names: list[str] = []
    for r in peer_rounds.rounds_of(report):
        names += [n for n in r["servers"] if n not in names]
    return names


def markdown(report: dict[str, Any]) -> str:
    cfg, m = report["config"], report["machine"]
    rounds = peer_rounds.rounds_of(report)
    first = rounds[0]["servers"]
    flags = ", ".join(f for f, on in (m.get("cpu_flags") or {}).items() if on) or "-"
    lines = [
        "# Serving peers, measured by `vllm bench serve`",
        "",
        f"- when: {report['started_at']} .. {report['finished_at']}; git {m.get('git_commit')}",
        f"- machine: {m.get('model_name')}, {m.get('cpus')} CPUs, {m.get('mem_total_mib')} MiB; "
        f"flags: {flags}; load average at start {report['loadavg_start']}",
        f"- load: random dataset, {cfg['input_len']} in / {cfg['output_len']} out tokens "
        f"(--ignore-eos), temperature {cfg['temperature']}, seed {cfg['seed']}; prompts per level "
        f"max({cfg['min_prompts']}, {cfg['prompts_per_client']} x c)"
        + (f", fixed {cfg['num_prompts']}" if cfg["num_prompts"] else "")
        + f"; {cfg['warmup_prompts']} warm-up prompts per server, discarded",
        "- each server alone on the machine, one concurrency level after the other; "
        "peak RSS: the summed VmRSS of the server's processes during the run (a started "
        "server's session; a server given by URL: the tree its port's process is in); "
        "a shared page counts once per process",
    ]
    if len(rounds) > 1:
        orders = "; ".join(" then ".join(LABELS[n] for n in r["order"]) for r in rounds)
        lines.append(
            f"- {len(rounds)} rounds, each server once per round, in alternating order "
            f"({orders}): each number below is the median over the rounds, each ratio the "
            "median of the ratios taken within a round"
        )
    for name, side in first.items():
        line = f"- {LABELS[name]}: {side['base_url']}"
        if side.get("command"):
            line += f" (`{side['command']}`)"
        versions = side.get("versions") or {}
        if versions:
            line += "; " + ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None)
        scope = side.get("memory_scope")
        if scope:
            line += f"; memory: pid {scope['root_pid']} and its descendants"
        if side.get("error"):
            line += f" -- ERROR: {side['error'].splitlines()[0]}"
        lines.append(line)
    lines += [
        "",
        "| server | c | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in server_names(report):
        if not peer_rounds.has_runs(report, name):
            continue  # failed before its first run: see its line above
        for c in cfg["concurrency"]:
            cells = [LABELS[name], str(c)]
            cells += [fmt(cell(report, name, c, k), d) for k, _, d in COLUMNS]
            cells.append(fmt(cell(report, name, c, "peak_rss_mib"), 0))
            lines.append("| " + " | ".join(cells) + " |")
    peers = [p for p in ("vllm", "llama") if peer_rounds.has_runs(report, p)]
    if peer_rounds.has_runs(report, "ours") and peers:
        lines += [
            "",
            "Ratios ours / peer (tok/s: above 1 is better; TTFT, TPOT, RSS: below 1 is better)",
            "",
            "| ours / | c | output tok/s | TTFT p50 | TTFT p99 | TPOT p50 | peak RSS |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for peer in peers:
            for c in cfg["concurrency"]:
                cells = [LABELS[peer], str(c)]
                for key in [k for k, _, _ in COLUMNS] + ["peak_rss_mib"]:
                    cells.append(fmt(peer_rounds.paired_ratio(report, peer, c, key), 2))
                lines.append("| " + " | ".join(cells) + " |")
        if len(rounds) > 1:
            lines += [
                "",
                "Output tok/s ratio ours / peer in each round",
                "",
                "| ours / | c | " + " | ".join(f"round {i + 1}" for i in range(len(rounds))) + " |",
                "|---|---:|" + "---:|" * len(rounds),
            ]
            for peer in peers:
                for c in cfg["concurrency"]:
                    per = peer_rounds.round_ratios(report, peer, c, "output_throughput")
                    cells = [LABELS[peer], str(c)] + [fmt(x, 2) for x in per]
                    lines.append("| " + " | ".join(cells) + " |")
    notes = []
    for i, r in enumerate(rounds):
        where, tag = (f" (round {i + 1})", f"_r{i + 1}") if len(rounds) > 1 else ("", "")
        for name, side in r["servers"].items():
            for c, run in side.get("runs", {}).items():
                res = run.get("result")
                if res is None:
                    log_name = f"logs/{name}{tag}_client.log"
                    notes.append(f"{LABELS[name]} c={c}{where}: client failed ({log_name})")
                elif res.get("failed"):
                    notes.append(f"{LABELS[name]} c={c}{where}: {res['failed']} failed requests")
    for name, side in first.items():
        slots = (side.get("versions") or {}).get("total_slots")
        if isinstance(slots, int) and any(c > slots for c in cfg["concurrency"]):
            notes.append(f"{LABELS[name]} has {slots} slots: above that, requests queue in it")
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["config"]["concurrency"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = [("output_throughput", "output tokens/s"), ("median_ttft_ms", "TTFT p50 (ms)")]
    for ax, (key, title) in zip(axes, panels, strict=True):
        for name in server_names(report):
            pts = [(c, cell(report, name, c, key)) for c in levels]
            pts = [(c, v) for c, v in pts if v is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=LABELS[name])
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrency (max in flight)")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend()
    m, cfg = report["machine"], report["config"]
    num_rounds = len(peer_rounds.rounds_of(report))
    fig.suptitle(
        f"vllm bench serve, {cfg['input_len']} in / {cfg['output_len']} out, "
        f"{m.get('model_name')} ({m.get('cpus')} CPUs)"
        + (f", median of {num_rounds} rounds" if num_rounds > 1 else ""),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def write_plot(report: dict[str, Any], json_path: Path, png: Path) -> bool:
    if not any(
        run.get("result")
        for r in peer_rounds.rounds_of(report)
        for side in r["servers"].values()
        for run in side["runs"].values()
    ):
        log("no results: no plot")
        return False
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        # (.venv/bin/python may be a symlink to this very interpreter: compare prefixes)
        if not PLOT_PYTHON.exists() or Path(sys.prefix).resolve() == (ROOT / ".venv").resolve():
            log("no matplotlib here and no .venv/bin/python: no plot")
            return False
        cmd = [str(PLOT_PYTHON), __file__, "--plot-from", str(json_path), "--plot-out", str(png)]
        return subprocess.call(cmd) == 0
    plot(report, png)
    return True


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("servers")
    g.add_argument("--ours-url", default=None, help="bench our server running here")
    g.add_argument("--ours-port", type=int, default=8000, help="when started (default 8000)")
    g.add_argument(
        "--ours-args", default="", help="extra `inferos serve` arguments, one shell-quoted string"
    )
    g.add_argument("--skip-ours", action="store_true")
    g.add_argument("--vllm-url", default=None, help="bench a vLLM server running here")
    g.add_argument("--vllm-port", type=int, default=8100, help="when started (default 8100)")
    g.add_argument(
        "--vllm-args", default="", help="extra `vllm serve` arguments, one shell-quoted string"
    )
    g.add_argument("--skip-vllm", action="store_true")
    g.add_argument("--llama-url", default=None, help="bench a llama-server running here too")
    g.add_argument("--vllm-venv", type=Path, default=DEFAULT_VLLM_VENV, help="default: .venv-vllm")
    g.add_argument("--startup-timeout-s", type=float, default=600.0, help="default: %(default)s")
    g = p.add_argument_group("load (vllm bench serve)")
    g.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    g.add_argument("--input-len", type=int, default=128)
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument("--prompts-per-client", type=int, default=3, help="default: %(default)s")
    g.add_argument("--min-prompts", type=int, default=6, help="default: %(default)s")
    g.add_argument(
        "--num-prompts", type=int, default=None, help="fixed prompts per level (short runs)"
    )
    g.add_argument(
        "--warmup-prompts", type=int, default=4, help="discarded, per server (default 4; 0: none)"
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--temperature", type=float, default=0.0, help="default 0 (greedy)")
    g.add_argument("--model-name", default=MODEL_NAME, help="the `model` field sent")
    g.add_argument(
        "--tokenizer",
        type=Path,
        default=default_model_dir(),
        help="tokenizer folder the client counts tokens with (default: %(default)s)",
    )
    g.add_argument("--client-args", default="", help="extra `vllm bench serve` arguments")
    g.add_argument(
        "--run-timeout-s", type=float, default=3600.0, help="per client run (default 3600)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every server this many times, in alternating order; report medians and "
        "ratios paired within a round (benchmarks/peer_rounds.py; default 1)",
    )
    p.add_argument("--mem-interval-s", type=float, default=1.0, help="RSS sample period")
    p.add_argument("--progress-every-s", type=float, default=30.0, help="progress line period")
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--plot-from", type=Path, default=None, help="only draw peers.png from a JSON")
    p.add_argument("--plot-out", type=Path, default=None, help="with --plot-from")
    args = p.parse_args(argv)
    if args.plot_from:
        return args
    if args.skip_ours and args.skip_vllm and not args.llama_url:
        p.error("nothing to run: --skip-ours and --skip-vllm without --llama-url")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if any(c <= 0 for c in args.concurrency):
        p.error("--concurrency values must be positive")
    if not (args.vllm_venv / "bin" / "vllm").exists():
        p.error(f"{args.vllm_venv}/bin/vllm not found (the client): run `make vllm-setup`")
    if not (args.tokenizer / "tokenizer.json").exists():
        p.error(f"no tokenizer at {args.tokenizer}: run `make model` or pass --tokenizer")
    return args


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot_from:
        plot(
            json.loads(args.plot_from.read_text()),
            args.plot_out or args.plot_from.with_suffix(".png"),
        )
        return 0
    out_dir = args.out_dir or ROOT / "benchmarks" / "results" / time.strftime("%Y-%m-%d") / "peers"
    (out_dir / "raw").mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)

    servers = server_specs(args, out_dir)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # unwinds like Ctrl-C: servers get stopped
    report: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine_info(),
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_start": loadavg(),
        "rounds": [],
    }
    names = [name for name, _, _ in servers]
    log(
        f"servers {[LABELS[n] for n in names]}, concurrency {args.concurrency}, "
        f"{args.input_len} in / {args.output_len} out, seed {args.seed}, "
        f"{args.rounds} round(s); out {out_dir}"
    )
    log(
        f"machine: {report['machine'].get('model_name')}, {report['machine'].get('cpus')} CPUs, "
        f"flags {report['machine'].get('cpu_flags')}, load {report['loadavg_start']}"
    )
    code = 0
    t0 = time.monotonic()
    by_name = {name: (url, make) for name, url, make in servers}
    try:
        for r in range(args.rounds):
            order = peer_rounds.round_order(names, r)
            this_round: dict[str, Any] = {"order": order, "servers": {}}
            report["rounds"].append(this_round)
            if args.rounds == 1:
                report["servers"] = this_round["servers"]  # the format before rounds
            tag = f"_r{r + 1}" if args.rounds > 1 else ""
            for name in order:
                url, make = by_name[name]
                log(
                    f"=== {LABELS[name]}"
                    + (f", round {r + 1} of {args.rounds}" if args.rounds > 1 else "")
                    + f" ({time.monotonic() - t0:.0f}s into the benchmark)"
                )
                side: dict[str, Any] = {"base_url": url, "runs": {}}
                this_round["servers"][name] = side
                try:
                    bench_server(name, url, make(tag), args, out_dir, side, tag)
                except (RuntimeError, TimeoutError) as e:
                    log(f"{LABELS[name]}: {e}")
                    side["error"] = str(e)
                    code = 1
    except KeyboardInterrupt:
        log("interrupted; servers this script started have been stopped")
        code = 130
    report["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    report["loadavg_end"] = loadavg()
    json_path, md_path, png = out_dir / "peers.json", out_dir / "peers.md", out_dir / "peers.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    md_path.write_text(md)
    print(md, flush=True)
    plotted = write_plot(report, json_path, png)
    log(f"wrote {json_path}, {md_path}" + (f", {png}" if plotted else ""))
    log(f"done in {time.monotonic() - t0:.0f}s")
    sides = [side for r in report["rounds"] for side in r["servers"].items()]
    for name, side in sides:
        for c, run in side.get("runs", {}).items():
            print("summary: " + summary_line(LABELS[name], int(c), run), flush=True)
    if code == 0 and any(
        run.get("result") is None for _, side in sides for run in side["runs"].values()
    ):
        code = 1
    return code


# a server's name, base URL, and what starts it for a round (given its tag; None: a server
# given by URL, benched as it runs)
ServerSpec = tuple[str, str, Callable[[str], ManagedServer | None]]


def server_specs(args: argparse.Namespace, out_dir: Path) -> list[ServerSpec]:
    """The servers to bench, in order; a started server gets a new log per round."""
    servers: list[ServerSpec] = []
    if not args.skip_ours:
        if args.ours_url:
            servers.append(("ours", args.ours_url, lambda tag: None))
        else:
            if os.environ.get("RAY_ADDRESS"):
                log(
                    "WARNING: RAY_ADDRESS is set: our server joins that cluster, whose "
                    "processes are outside its session and not in its RSS"
                )
            cmd = [str(DEFAULT_OURS_BIN), "serve", "--host", "127.0.0.1"]
            cmd += ["--port", str(args.ours_port), *shlex.split(args.ours_args)]

            def ours(tag: str) -> ManagedServer:
                log_path = out_dir / "logs" / f"ours{tag}_server.log"
                return ManagedServer("ours", cmd, dict(os.environ), log_path)

            servers.append(("ours", f"http://127.0.0.1:{args.ours_port}", ours))
    if not args.skip_vllm:
        if args.vllm_url:
            servers.append(("vllm", args.vllm_url, lambda tag: None))
        else:
            env = dict(os.environ, PORT=str(args.vllm_port), VLLM_VENV=str(args.vllm_venv))
            vllm_cmd = ["bash", str(VLLM_SERVE_SH), *shlex.split(args.vllm_args)]

            def vllm(tag: str) -> ManagedServer:
                log_path = out_dir / "logs" / f"vllm{tag}_server.log"
                return ManagedServer("vllm", vllm_cmd, env, log_path)

            servers.append(("vllm", f"http://127.0.0.1:{args.vllm_port}", vllm))
    if args.llama_url:
        servers.append(("llama", args.llama_url, lambda tag: None))
    return servers


if __name__ == "__main__":
    sys.exit(main())
