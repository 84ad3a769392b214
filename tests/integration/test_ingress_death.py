"""Issue 14, item 5: when an ingress replica dies, decode aborts the streams it was serving
instead of decoding them to max_tokens for nobody; Serve replaces the ingress and new
requests succeed."""

from __future__ import annotations

import threading
import time

import pytest
import ray

from deployments.launch import wait_healthy
from tests.integration.conftest import MODEL

pytestmark = pytest.mark.integration

MAX_TOKENS = 1800


def _ingress_actor():
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "#ingress#" in actor["name"]:
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise AssertionError("no ingress replica actor")


def test_decode_aborts_the_streams_of_a_dead_ingress(app) -> None:
    decode = app.deployment("decode")
    chunks: list[float] = []
    ended = threading.Event()

    def stream() -> None:
        try:
            for _ in app.client().completions.create(
                model=MODEL, prompt="Once upon a time", max_tokens=MAX_TOKENS, stream=True,
                extra_body={"ignore_eos": True},
            ):  # fmt: skip
                chunks.append(time.perf_counter())
        except Exception:
            pass  # the ingress dies under it
        finally:
            ended.set()

    client = threading.Thread(target=stream, daemon=True)
    client.start()
    deadline = time.monotonic() + 120
    while len(chunks) < 20 and time.monotonic() < deadline and not ended.is_set():
        time.sleep(0.05)
    assert len(chunks) >= 20, "the stream did not start"
    assert decode.stats.remote().result()["num_running"] == 1
    rate = (len(chunks) - 1) / (chunks[-1] - chunks[0])  # chunks (tokens or more) per second
    remaining_s = (MAX_TOKENS - len(chunks)) / rate  # an upper bound if chunks hold >1 token

    ray.kill(_ingress_actor(), no_restart=False)
    killed = time.perf_counter()
    running = 1
    while running and time.perf_counter() - killed < remaining_s:
        time.sleep(0.2)
        running = decode.stats.remote().result()["num_running"]
    aborted_after = time.perf_counter() - killed
    assert running == 0, f"decode still ran the stream {aborted_after:.1f} s after"
    assert aborted_after < 0.5 * remaining_s, (aborted_after, remaining_s)
    assert ended.wait(60)

    wait_healthy(app.url, 180)  # Serve replaces the ingress; the app serves again
    out = app.client().completions.create(model=MODEL, prompt="Hello", max_tokens=4)
    assert out.choices[0].text
