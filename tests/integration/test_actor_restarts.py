"""Issue 14, item 5: the scheduler and the KV store are restarted when their process dies.

Killed under load (four streams running), the streams complete, /health says 503 while the
actor is away and 200 again after, and new requests succeed within `RECOVERY_BOUND_S`
(measured here: the actor's restart plus the replicas' next load report take 2-5 s on a
2-core machine; the bound leaves room for a loaded CI box).
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import ray
from openai import APIStatusError

from tests.integration.conftest import MODEL

pytestmark = pytest.mark.integration

RECOVERY_BOUND_S = 30.0
STREAMS = 4


def _streams_under_way(app, results: list[str], ready: threading.Barrier) -> list[threading.Thread]:
    def run(i: int) -> None:
        try:
            stream = app.client().completions.create(
                model=MODEL, prompt=f"Story number {i}:", max_tokens=160, stream=True,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            n = 0
            for chunk in stream:
                n += 1
                if n == 3:
                    ready.wait(60)
                if chunk.choices and chunk.choices[0].finish_reason:
                    results.append(chunk.choices[0].finish_reason)
        except Exception as e:
            results.append(f"error: {e}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    return threads


def _first_success_after(app, started: float) -> float:
    """Seconds from `started` until a new request succeeds."""
    client = app.client()
    while time.perf_counter() - started < 120:
        try:
            out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4)
            if out.choices[0].text:
                return time.perf_counter() - started
        except APIStatusError as e:
            assert e.status_code == 503, e  # unavailable while restarting, nothing else
        time.sleep(0.25)
    raise AssertionError("no request succeeded within 120 s")


@pytest.mark.parametrize("which", ["kv_store", "scheduler"])
def test_a_killed_singleton_is_restarted_and_streams_complete(app, which: str) -> None:
    actor = app.kv_store() if which == "kv_store" else app.scheduler()
    pid_before = ray.get(actor.__ray_call__.remote(lambda self: __import__("os").getpid()))
    results: list[str] = []
    ready = threading.Barrier(STREAMS + 1)
    threads = _streams_under_way(app, results, ready)
    ready.wait(120)  # every stream has its first tokens

    ray.kill(actor, no_restart=False)  # as a crash: Ray may restart it
    killed = time.perf_counter()
    saw_unhealthy = False
    with httpx.Client(base_url=app.url, timeout=10) as http:
        for _ in range(10):
            if http.get("/health").status_code == 503:
                saw_unhealthy = True
                break
            time.sleep(0.05)
    recovered_s = _first_success_after(app, killed)
    for t in threads:
        t.join(180)

    assert results == ["length"] * STREAMS, results  # the running streams completed
    assert recovered_s < RECOVERY_BOUND_S, recovered_s
    print(f"{which}: a new request succeeded {recovered_s:.1f} s after the kill")
    pid_after = ray.get(actor.__ray_call__.remote(lambda self: __import__("os").getpid()))
    assert pid_after != pid_before  # a new process, found through the same handle
    with httpx.Client(base_url=app.url, timeout=10) as http:
        assert http.get("/health").status_code == 200
    assert saw_unhealthy or recovered_s < 1.0  # a restart that fast may slip between probes
