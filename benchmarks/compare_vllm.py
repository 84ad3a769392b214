"""Side-by-side benchmark: our server vs. `vllm serve` of the same model, same load.

For each server in turn (ours first, then vLLM), the server is made ready, the bench client
(`python -m serving.bench`, run as a subprocess with the main venv's python) is run once per
concurrency level, one level after the other, and a server this script started is stopped
before the next one starts, so the two never share the CPU. Then it writes
`compare.json` (every bench summary, plus ratios) and `compare.md` (a table of ours/vLLM ratios
for output tokens/s, TTFT p50 and ITL p50) into --out-dir.

Ours:  --ours-url URL of a server you started (default http://127.0.0.1:8000), or
       --ours-cmd "COMMAND" to have this script start it (and stop it after), or --skip-ours.
vLLM:  started by this script with scripts/vllm_serve.sh (.venv-vllm; `make vllm-setup` first)
       on --vllm-port, waited on until /v1/models answers, stopped after; or --vllm-url URL
       of one already running; or --skip-vllm.

Examples:
    .venv/bin/python benchmarks/compare_vllm.py --ours-url http://127.0.0.1:8000
    .venv/bin/python benchmarks/compare_vllm.py --ours-cmd "make serve" --concurrency 1 8
    .venv/bin/python benchmarks/compare_vllm.py --skip-ours --concurrency 1 --num-prompts 8

Ratios are ours/vLLM: above 1 is better for tokens/s, below 1 is better for TTFT and ITL.
Standard library only, so it runs under any python3.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
VLLM_SERVE_SH = ROOT / "scripts" / "vllm_serve.sh"
DEFAULT_VLLM_VENV = ROOT / ".venv-vllm"

# (key in a bench summary, label, higher is better)
METRICS: list[tuple[str, str, bool]] = [
    ("output_tokens_per_s", "output tok/s", True),
    ("ttft_ms.p50", "TTFT p50 (ms)", False),
    ("itl_ms.p50", "ITL p50 (ms)", False),
]


def log(msg: str) -> None:
    print(f"[compare_vllm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- servers


def models_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    return (base if base.endswith("/v1") else base + "/v1") + "/models"


def server_root(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


def http_get_json(url: str, timeout_s: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (loopback URLs)
        return json.loads(resp.read().decode())


def models_ready(base_url: str) -> list[str] | None:
    """Model ids if GET /v1/models answers with a non-empty list, else None."""
    try:
        data = http_get_json(models_url(base_url))
    except (OSError, ValueError, urllib.error.URLError):
        return None
    ids = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]
    return ids if ids and healthy(base_url) else None


def healthy(base_url: str) -> bool:
    """GET /health is 200 (or the server has none): /v1/models can answer before the
    replicas that serve a request are up (ours answers from its ingress, 503s follow)."""
    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        with urllib.request.urlopen(f"{root}/health", timeout=5.0) as resp:  # noqa: S310
            return resp.status == 200
    except urllib.error.HTTPError as e:
        return e.code == 404
    except (OSError, ValueError):
        return False


def port_open(base_url: str) -> bool:
    parts = urlsplit(base_url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


class ManagedServer:
    """A server process this script started in its own process group; stop() ends the group."""

    def __init__(self, name: str, cmd: list[str] | str, env: dict[str, str], log_path: Path):
        self.name = name
        self.cmd = cmd
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        shown = self.cmd if isinstance(self.cmd, str) else shlex.join(self.cmd)
        log(f"starting {self.name}: {shown}  (log: {self.log_path})")
        self.proc = subprocess.Popen(
            self.cmd,
            shell=isinstance(self.cmd, str),
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() reaches workers too
        )

    def wait_ready(self, base_url: str, timeout_s: float) -> list[str]:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        t0 = time.monotonic()
        next_note = t0 + 30
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {code} before answering; "
                    f"last lines of {self.log_path}:\n{tail(self.log_path)}"
                )
            ids = models_ready(base_url)
            if ids:
                log(f"{self.name} ready after {time.monotonic() - t0:.0f}s, models {ids}")
                return ids
            if time.monotonic() >= next_note:
                log(f"  still waiting for {models_url(base_url)} ({time.monotonic() - t0:.0f}s)")
                next_note += 30
            time.sleep(1.0)
        raise TimeoutError(
            f"{self.name} not ready after {timeout_s:.0f}s; last lines of {self.log_path}:\n"
            f"{tail(self.log_path)}"
        )

    def stop(self, grace_s: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            log(f"stopping {self.name} (pid {proc.pid})")
            for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGTERM, 10.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    log(f"  {self.name} still running after {sig.name}")
            else:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10.0)
        if proc is not None:
            # Workers that outlived the leader (same process group) are ended too, and waited
            # for, so the next server gets the whole CPU.
            if not _wait_group_gone(proc.pid, 0, 10.0) and not _wait_group_gone(
                proc.pid, signal.SIGKILL, 10.0
            ):
                log(f"WARNING: processes of {self.name}'s group {proc.pid} are still alive")
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def _wait_group_gone(pgid: int, sig: int, timeout_s: float) -> bool:
    """Send `sig` (0: just probe) to the group until it is empty; True once it is."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return True
        time.sleep(0.2)
    return False


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- bench runs


def num_prompts_for(concurrency: int, args: argparse.Namespace) -> int:
    if args.num_prompts:
        return args.num_prompts
    return max(args.min_prompts, args.prompts_per_client * concurrency)


def run_bench(
    args: argparse.Namespace,
    base_url: str,
    concurrency: int,
    num_prompts: int,
    output_len: int,
    json_path: Path,
    log_path: Path,
) -> dict[str, Any] | None:
    """One bench client run as a subprocess; its JSON summary, or None if it failed."""
    cmd = [
        args.bench_python,
        "-m",
        "serving.bench",
        "--base-url",
        base_url,
        "--concurrency",
        str(concurrency),
        "--num-prompts",
        str(num_prompts),
        "--input-len",
        str(args.input_len),
        "--output-len",
        str(output_len),
        "--output-json",
        str(json_path),
        "--no-plot",
        "--no-progress",
        *shlex.split(args.bench_args),
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    json_path.unlink(missing_ok=True)
    log(f"  bench: {shlex.join(cmd)}")
    t0 = time.monotonic()
    with open(log_path, "ab") as out:
        code = subprocess.call(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if code != 0 or not json_path.exists():
        log(f"  bench failed (exit {code}); last lines of {log_path}:\n{tail(log_path, 15)}")
        return None
    summary = json.loads(json_path.read_text())
    log(
        f"  c={concurrency}: {summary.get('output_tokens_per_s', 0):.1f} out tok/s, "
        f"TTFT p50 {fmt(get(summary, 'ttft_ms.p50'))} ms, "
        f"ITL p50 {fmt(get(summary, 'itl_ms.p50'))} ms, "
        f"ok {summary.get('completed')}/{num_prompts} ({time.monotonic() - t0:.0f}s)"
    )
    return summary


def bench_server(
    name: str, base_url: str, args: argparse.Namespace, out_dir: Path
) -> dict[str, Any]:
    result: dict[str, Any] = {"base_url": base_url, "runs": {}}
    if args.warmup_prompts > 0:
        # Several at once: the first batches of a fresh server (either one) run slow.
        warm_c = min(args.warmup_prompts, max(args.concurrency))
        log(
            f"{name}: warm-up ({args.warmup_prompts} requests at concurrency {warm_c}, not counted)"
        )
        run_bench(
            args,
            base_url,
            warm_c,
            args.warmup_prompts,
            min(16, args.output_len),
            out_dir / f"{name}_warmup.json",
            out_dir / f"{name}_bench.log",
        )
    for c in args.concurrency:
        n = num_prompts_for(c, args)
        log(f"{name}: concurrency {c}, {n} prompts, {args.input_len} in / {args.output_len} out")
        summary = run_bench(
            args,
            base_url,
            c,
            n,
            args.output_len,
            out_dir / f"{name}_c{c}.json",
            out_dir / f"{name}_bench.log",
        )
        result["runs"][str(c)] = summary
    return result


def vllm_version(base_url: str, vllm_venv: Path) -> str | None:
    try:  # vLLM's server answers GET /version
        return str(http_get_json(server_root(base_url) + "/version").get("version"))
    except (OSError, ValueError, AttributeError, urllib.error.URLError):
        pass
    python = vllm_venv / "bin" / "python"
    if python.exists():
        r = subprocess.run(
            [str(python), "-c", "import vllm; print(vllm.__version__)"],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode == 0:
            return r.stdout.strip().splitlines()[-1]
    return None


def run_side(
    name: str,
    base_url: str,
    server: ManagedServer | None,
    args: argparse.Namespace,
    out_dir: Path,
) -> dict[str, Any]:
    if server is None:
        ids = models_ready(base_url)
        if not ids:
            raise RuntimeError(
                f"nothing answers {models_url(base_url)}; start it first"
                + (" or pass --ours-cmd" if name == "ours" else "")
            )
        log(f"{name}: using the running server at {base_url}, models {ids}")
        result = bench_server(name, base_url, args, out_dir)
    else:
        if port_open(base_url):
            raise RuntimeError(
                f"something already listens at {base_url}; stop it, pick another "
                f"port, or pass its URL to bench it as it is"
            )
        server.start()
        try:
            ids = server.wait_ready(base_url, args.startup_timeout_s)
            result = bench_server(name, base_url, args, out_dir)
            if name == "vllm":
                result["version"] = vllm_version(base_url, args.vllm_venv)
        finally:
            server.stop()
        if port_open(base_url):
            log(f"WARNING: {base_url} still accepts connections after stopping {name}")
        result["server_log"] = str(server.log_path)
        result["command"] = server.cmd if isinstance(server.cmd, str) else shlex.join(server.cmd)
    result["models"] = ids
    return result


# --------------------------------------------------------------------------- report


def get(summary: dict[str, Any] | None, dotted: str) -> float | None:
    value: Any = summary
    for key in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def compute_ratios(
    ours: dict[str, Any] | None, vllm: dict[str, Any] | None, levels: list[int]
) -> dict[str, dict[str, float | None]]:
    ratios: dict[str, dict[str, float | None]] = {}
    for c in levels:
        o = (ours or {}).get("runs", {}).get(str(c))
        v = (vllm or {}).get("runs", {}).get(str(c))
        row: dict[str, float | None] = {}
        for key, _, _ in METRICS:
            a, b = get(o, key), get(v, key)
            row[key] = a / b if a is not None and b not in (None, 0.0) else None
        ratios[str(c)] = row
    return ratios


def side_line(label: str, side: dict[str, Any] | None) -> str:
    if side is None:
        return f"- {label}: skipped"
    line = f"- {label}: {side['base_url']}"
    if side.get("command"):
        line += f" (`{side['command']}`)"
    if side.get("error"):
        line += f" -- ERROR: {side['error'].splitlines()[0]}"
    return line


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    ours, vllm = report["servers"].get("ours"), report["servers"].get("vllm")
    lines = [
        "# Infer-OS Serve vs vLLM",
        "",
        f"- when: {report['finished_at']}; machine: {report['machine']}",
        f"- load: {cfg['input_len']} input / {cfg['output_len']} output tokens per request, "
        f"concurrency {', '.join(map(str, cfg['concurrency']))}, one level after the other"
        + (f"; bench extra args `{cfg['bench_args']}`" if cfg["bench_args"] else ""),
        side_line("ours", ours),
        side_line("vLLM" + (f" {vllm['version']}" if vllm and vllm.get("version") else ""), vllm),
        "- ratio = ours / vLLM: above 1 is better for tok/s, below 1 is better for TTFT and ITL",
        "",
        "| concurrency | prompts | ours tok/s | vLLM tok/s | tok/s ratio "
        "| ours TTFT p50 ms | vLLM TTFT p50 ms | TTFT ratio "
        "| ours ITL p50 ms | vLLM ITL p50 ms | ITL ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cfg["concurrency"]:
        o = (ours or {}).get("runs", {}).get(str(c))
        v = (vllm or {}).get("runs", {}).get(str(c))
        r = report["ratios"][str(c)]
        cells = [str(c), str(num_prompts_for(c, argparse.Namespace(**cfg)))]
        for key, _, _ in METRICS:
            digits = 1 if key == "output_tokens_per_s" else 2
            cells += [fmt(get(o, key), digits), fmt(get(v, key), digits), fmt(r[key], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    failed = []
    for name, side in (("ours", ours), ("vLLM", vllm)):
        for c, s in (side or {}).get("runs", {}).items():
            if s is None:
                failed.append(f"{name} c={c}: bench failed (see {name.lower()}_bench.log)")
            elif s.get("failed"):
                failed.append(f"{name} c={c}: {s['failed']} failed requests {s.get('errors')}")
    if failed:
        lines += ["", "Failures:", *[f"- {f}" for f in failed]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="See the module docstring (benchmarks/compare_vllm.py) for examples.",
    )
    g = p.add_argument_group("our server")
    g.add_argument("--ours-url", default="http://127.0.0.1:8000", help="default: %(default)s")
    g.add_argument(
        "--ours-cmd",
        default=None,
        help="shell command that starts our server at --ours-url in the foreground; "
        "started before and stopped after our runs (default: use a running server)",
    )
    g.add_argument("--skip-ours", action="store_true", help="bench vLLM only")
    g = p.add_argument_group("vLLM")
    g.add_argument("--vllm-port", type=int, default=8100, help="default: %(default)s")
    g.add_argument(
        "--vllm-url",
        default=None,
        help="bench a vLLM server already running here instead of starting one",
    )
    g.add_argument("--skip-vllm", action="store_true", help="bench ours only")
    g.add_argument("--vllm-venv", type=Path, default=DEFAULT_VLLM_VENV, help="default: %(default)s")
    g.add_argument(
        "--model-dir",
        default=None,
        help="HF folder vLLM serves (default: scripts/vllm_serve.sh's, the default model)",
    )
    g.add_argument(
        "--vllm-args", default="", help="extra `vllm serve` arguments, one shell-quoted string"
    )
    g = p.add_argument_group("load")
    g.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    g.add_argument("--input-len", type=int, default=128)
    g.add_argument("--output-len", type=int, default=128)
    g.add_argument(
        "--num-prompts",
        type=int,
        default=None,
        help="requests per level (default: max(--min-prompts, --prompts-per-client x concurrency))",
    )
    g.add_argument("--prompts-per-client", type=int, default=4, help="default: %(default)s")
    g.add_argument("--min-prompts", type=int, default=8, help="default: %(default)s")
    g.add_argument(
        "--warmup-prompts",
        type=int,
        default=8,
        help="uncounted short requests sent to each server first, up to the highest "
        "concurrency at once (0: none) (default: %(default)s)",
    )
    g.add_argument(
        "--bench-args",
        default="",
        help="extra bench client arguments, one shell-quoted string, e.g. '--endpoint chat'",
    )
    g.add_argument(
        "--bench-python",
        default=str(ROOT / ".venv" / "bin" / "python")
        if (ROOT / ".venv" / "bin" / "python").exists()
        else sys.executable,
        help="python that runs the bench client (default: %(default)s)",
    )
    p.add_argument(
        "--startup-timeout-s",
        type=float,
        default=600.0,
        help="wait this long for /v1/models (default: %(default)s)",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where JSON, markdown and logs go (default: results/compare_vllm_<timestamp>)",
    )
    args = p.parse_args(argv)
    if args.skip_ours and args.skip_vllm:
        p.error("--skip-ours and --skip-vllm leave nothing to run")
    for c in args.concurrency:
        if c <= 0:
            p.error(f"--concurrency values must be positive, got {c}")
    return args


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = args.out_dir or ROOT / "results" / f"compare_vllm_{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    vllm_url = args.vllm_url or f"http://127.0.0.1:{args.vllm_port}"

    servers: list[tuple[str, str, ManagedServer | None]] = []
    if not args.skip_ours:
        ours = None
        if args.ours_cmd:
            ours = ManagedServer(
                "ours", args.ours_cmd, dict(os.environ), out_dir / "ours_server.log"
            )
        servers.append(("ours", args.ours_url, ours))
    if not args.skip_vllm:
        vllm = None
        if not args.vllm_url:
            env = dict(os.environ, PORT=str(args.vllm_port), VLLM_VENV=str(args.vllm_venv))
            if args.model_dir:
                env["MODEL_DIR"] = str(args.model_dir)
            cmd = ["bash", str(VLLM_SERVE_SH), *shlex.split(args.vllm_args)]
            vllm = ManagedServer("vllm", cmd, env, out_dir / "vllm_server.log")
        servers.append(("vllm", vllm_url, vllm))

    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the finally blocks stop the servers.
    signal.signal(signal.SIGTERM, _raise_interrupt)

    report: dict[str, Any] = {
        "config": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("out_dir",)
        },
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "servers": {},
    }
    code = 0
    try:
        for name, url, server in servers:
            try:
                report["servers"][name] = run_side(name, url, server, args, out_dir)
            except (RuntimeError, TimeoutError) as e:
                log(f"{name}: {e}")
                report["servers"][name] = {"base_url": url, "runs": {}, "error": str(e)}
                code = 1
    except KeyboardInterrupt:
        log("interrupted; servers this script started have been stopped")
        code = 130
    report["finished_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
    report["ratios"] = compute_ratios(
        report["servers"].get("ours"), report["servers"].get("vllm"), args.concurrency
    )
    json_path, md_path = out_dir / "compare.json", out_dir / "compare.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    md_path.write_text(md)
    print(md)
    log(f"wrote {json_path} and {md_path}")
    if code == 0 and any(
        s is None for side in report["servers"].values() for s in side["runs"].values()
    ):
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
