"""Issue 14, item 3 on the live app: limits that protect the server.

- a body over `server.max_body_bytes` is a 413 before it is read, and headers over
  `server.max_header_bytes` a 431;
- tokenizing a large prompt runs off the ingress's event loop: /health and running streams
  keep answering meanwhile;
- admission comes first: at its in-flight limit the ingress answers 429 without tokenizing;
- client-chosen session ids are stored bounded in length, whatever their size.
"""

from __future__ import annotations

import statistics
import threading
import time

import httpx
import pytest
import ray

from tests.integration.conftest import MAX_PENDING, MODEL

pytestmark = pytest.mark.integration

COMPLETIONS = "/v1/completions"
# ~0.9 MiB of text: under the 1 MiB body limit, ~200k tokens (refused for the context, but
# only after tokenizing it, which takes on the order of a second)
BIG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 20_000


def _big_request(http: httpx.Client) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    resp = http.post(COMPLETIONS, json={"model": MODEL, "prompt": BIG_PROMPT, "max_tokens": 4})
    return resp, time.perf_counter() - started


def test_an_oversized_body_is_413_and_the_server_stays_healthy(app) -> None:
    limit = app.config.max_body_bytes
    with app.http() as http:
        resp = http.post(
            COMPLETIONS, json={"model": MODEL, "prompt": "x" * (limit + 1), "max_tokens": 4}
        )
        assert resp.status_code == 413, resp.text
        err = resp.json()["error"]
        assert err["code"] == "request_too_large" and str(limit) in err["message"]
        assert http.get("/health").status_code == 200


def test_oversized_headers_are_431(app) -> None:
    with app.http() as http:
        resp = http.get("/v1/models", headers={"X-Session-Id": "s" * (256 << 10)})
        assert resp.status_code == 431, resp.text
        assert resp.json()["error"]["code"] == "request_header_fields_too_large"
        assert http.get("/health").status_code == 200


def test_health_and_streams_keep_answering_while_a_large_prompt_tokenizes(app) -> None:
    with app.http() as http:
        resp, alone_s = _big_request(http)
        assert resp.status_code == 400, resp.text  # tokenized, then too long for the context
        assert resp.json()["error"]["code"] == "context_length_exceeded"

        health_s: list[float] = []
        done = threading.Event()

        def probe() -> None:
            with app.http() as probe_http:
                while not done.is_set():
                    t = time.perf_counter()
                    assert probe_http.get("/health").status_code == 200
                    health_s.append(time.perf_counter() - t)
                    time.sleep(0.02)

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            time.sleep(0.2)
            resp, loaded_s = _big_request(http)
        finally:
            done.set()
            prober.join()
    assert resp.status_code == 400
    # /health waits for nothing the large prompt does: its slowest answer is well under the
    # time the prompt took (it took them all when tokenizing held the event loop)
    assert len(health_s) >= 3
    assert max(health_s) < 0.5 * min(alone_s, loaded_s), (max(health_s), alone_s, loaded_s)
    assert statistics.median(health_s) < 0.25 * alone_s


def test_at_the_in_flight_limit_a_large_prompt_is_refused_without_tokenizing(app) -> None:
    client = app.client()
    with app.http() as http:
        _, tokenize_s = _big_request(http)
    streams = [
        client.completions.create(
            model=MODEL, prompt=f"Count from {i}:", max_tokens=400, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        for i in range(MAX_PENDING)
    ]
    try:
        for s in streams:
            next(iter(s))  # every one admitted and running
        with app.http() as http:
            resp, refused_s = _big_request(http)
        assert resp.status_code == 429, resp.text
        assert refused_s < 0.5 * tokenize_s, (refused_s, tokenize_s)
    finally:
        for s in streams:
            s.close()


def test_session_ids_are_stored_bounded_whatever_their_size(app) -> None:
    client = app.client()
    long_ids = [f"{i}-" + "s" * (60 << 10) for i in range(3)]  # under the header limit
    for sid in long_ids:
        client.completions.create(
            model=MODEL, prompt="Hi", max_tokens=2, extra_headers={"X-Session-Id": sid}
        )
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, user="u" * 100_000)
    stored = ray.get(app.scheduler().snapshot.remote())["sessions"]
    assert stored and max(len(k) for k in stored) <= 2 + 128
    hashed = [k for k in stored if k.startswith("h:sha256:")]
    assert len(hashed) >= 3  # each long id kept its own (hashed) session
