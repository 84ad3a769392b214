"""On the local cluster, the ingress replicas answer `server.port` themselves (one hop less
per streamed chunk) and Serve's proxy sits on another port; `direct_http: false` keeps the
proxy on `server.port`."""

from __future__ import annotations

import time

import httpx
import psutil
import pytest
from ray.serve.context import _get_global_client

from tests.integration.conftest import MODEL
from tests.integration.metrics_util import total

pytestmark = pytest.mark.integration

INGRESS = "ray::ServeReplica:inferos:ingress"
PROXY = "ray::ProxyActor"
# two ingress replicas: both listen on the one port (SO_REUSEPORT)
DIRECT = {"scheduling": {"pd_mode": "colocated"}, "ingress": {"num_replicas": 2}}


def _listeners(port: int) -> list[str]:
    """The process titles of everything listening on 127.0.0.1:port."""
    pids = [
        c.pid
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid is not None
    ]
    return sorted(psutil.Process(pid).cmdline()[0] for pid in pids)


def _proxy_port() -> int:
    return _get_global_client().http_config.port  # what launch.run_app gave serve.start


def test_ingress_replicas_serve_the_port_and_the_proxy_is_elsewhere(apps) -> None:
    app = apps.get(DIRECT)
    port = app.config.server.port
    assert _listeners(port) == [INGRESS, INGRESS]
    proxy_port = _proxy_port()
    assert proxy_port != port
    assert _listeners(proxy_port) == [PROXY]
    for url in (app.url, f"http://127.0.0.1:{proxy_port}"):  # both paths answer
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": MODEL, "prompt": "Hello", "max_tokens": 4, "stream": True},
            timeout=120,
        )
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text


def test_client_leaving_a_non_streaming_request_aborts_it(apps) -> None:
    app = apps.get(DIRECT)
    decode = app.deployment("decode")
    before = decode.stats.remote().result()["num_local_prefills"]
    body = {"model": MODEL, "prompt": "Count:", "max_tokens": 1800, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):  # the client gives up and closes
        httpx.post(f"{app.url}/v1/completions", json=body, timeout=3)
    # aborted: decode is idle long before 1800 tokens could be done (~20 s at 95 tok/s)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = decode.stats.remote().result()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            break
        time.sleep(0.5)
    assert stats["num_local_prefills"] == before + 1  # it did reach decode
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0, stats
    while time.monotonic() < deadline + 10:  # other ingress replicas push theirs each second
        in_flight = total(app.metrics_text(), "inferos:ingress_requests_in_flight")
        if in_flight == 0:
            break
        time.sleep(0.5)
    assert in_flight == 0


def test_direct_http_off_keeps_the_proxy_on_the_port(apps) -> None:
    app = apps.get({"scheduling": {"pd_mode": "colocated"}, "server": {"direct_http": False}})
    port = app.config.server.port
    assert _proxy_port() == port
    assert _listeners(port) == [PROXY]
    with app.http() as h:
        assert h.get("/health").status_code == 200
