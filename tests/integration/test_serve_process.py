"""`inferos serve` as a user runs it, in its own process with its own local Ray cluster
(issue 14, items 4 and 5): every port it opens listens on loopback only, Ray refuses a
client without the cluster's token, API keys (several) guard every route but the public
ones, and SIGTERM in the middle of a stream stops everything within 10 s, exit code 0,
no process left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from deployments.direct_http import free_port
from deployments.launch import ENABLE_CLUSTERS_ENV
from tests.integration.conftest import MODEL

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
INFEROS = Path(sys.executable).parent / "inferos"
KEYS = ("first-key", "second-key")
STOP_WITHIN_S = 10.0
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


class Served:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    port = free_port("127.0.0.1")
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(INFEROS), "serve", "--port", str(port), "--api-key", *KEYS],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"inferos serve exited early:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail(f"inferos serve not healthy in 600 s:\n{log.read_text()[-3000:]}")
        yield Served(proc, url, log)
    finally:
        if proc.poll() is None:  # a failed test: don't leave a cluster running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_every_listening_port_is_on_loopback(served: Served) -> None:
    pids = {p.pid for p in served.tree()}
    listening = [
        c for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]  # fmt: skip
    names = {psutil.Process(c.pid).name() for c in listening}
    assert {"gcs_server", "raylet"} <= names, names  # Ray's own servers are among them
    exposed = [
        (psutil.Process(c.pid).name(), c.laddr) for c in listening if c.laddr.ip not in LOOPBACK
    ]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_ray_refuses_a_client_without_the_cluster_token(served: Served) -> None:
    gcs = next(
        c.laddr for p in served.tree() if p.name() == "gcs_server"
        for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
    )  # fmt: skip
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="not-the-token")
    env[ENABLE_CLUSTERS_ENV] = "0"  # as launch sets it: else Ray maps 127.0.0.1 to the LAN IP
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    code = f"import ray; ray.init(address='127.0.0.1:{gcs.port}'); print('CONNECTED')"
    client = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    seen = []
    try:
        for line in client.stdout:  # Ray retries for 20 s; the first refusal is enough
            seen.append(line)
            if "InvalidAuthToken" in line or "CONNECTED" in line:
                break
    finally:
        client.kill()
        client.wait()
    text = "".join(seen)
    assert "InvalidAuthToken" in text and "CONNECTED" not in text, text[-2000:]


def test_api_keys_guard_every_route_but_the_public_ones(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=60) as http:
        for path in ("/v1/models", "/version", "/v1/metrics", "/v1/policy", "/v1/health"):
            resp = http.get(path)
            assert resp.status_code == 401, (path, resp.text)
            assert resp.json()["error"]["code"] == "invalid_api_key"
            assert http.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            for key in KEYS:
                ok = http.get(path, headers={"Authorization": f"Bearer {key}"})
                assert ok.status_code == 200, (path, ok.text)
        for path in ("/health", "/metrics", "/"):
            assert http.get(path).status_code == 200, path
        # an unauthenticated generation request starts nothing
        resp = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi"})
        assert resp.status_code == 401


def test_sigterm_mid_stream_stops_everything_within_10_s(served: Served) -> None:
    tree = served.tree()
    assert len(tree) > 3
    first_chunk = threading.Event()

    def stream() -> None:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000,
                "stream": True, "ignore_eos": True}  # fmt: skip
        headers = {"Authorization": f"Bearer {KEYS[0]}"}
        try:
            with httpx.stream(
                "POST", f"{served.url}/v1/completions", json=body, headers=headers, timeout=60
            ) as resp:
                for _ in resp.iter_lines():
                    first_chunk.set()
        except httpx.HTTPError:
            pass  # the server going away ends the stream; that is the point

    client = threading.Thread(target=stream, daemon=True)
    client.start()
    assert first_chunk.wait(120), "no streamed chunk"
    started = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    code = served.proc.wait(timeout=60)
    took = time.monotonic() - started
    _, alive = psutil.wait_procs(tree[1:], timeout=2)
    log = served.log.read_text()[-3000:]
    assert code == 0, log
    assert took < STOP_WITHIN_S, f"stopped in {took:.1f} s\n{log}"
    assert not alive, f"left running: {[p.pid for p in alive]}"
    client.join(30)
