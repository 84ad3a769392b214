"""Every error case answers in OpenAI's shape, and the next request still succeeds."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.integration.conftest import MAX_PENDING, MODEL
from tests.integration.metrics_util import total

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}


def _assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if code is not None:
        assert err["code"] == code
    return err


def _assert_still_serving(h: httpx.Client) -> None:
    resp = h.post(CHAT, json=GOOD)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{not json", None),
        (b'["a list"]', None),
        (b'{"model": "SmolLM2-135M-Instruct"}', "messages"),
        (b'{"model": "SmolLM2-135M-Instruct", "messages": [], "max_tokens": 4}', "messages"),
        (
            b'{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "x"}], '
            b'"temperature": 5}',
            "temperature",
        ),
        (
            b'{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "x"}], '
            b'"max_tokens": -3}',
            "max_tokens",
        ),
        (
            b'{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "wizard", "content": "x"}]}',
            "messages.0.role",
        ),
    ],
)
def test_malformed_requests_are_400(app, body: bytes, param: str | None) -> None:
    with app.http() as h:
        resp = h.post(CHAT, content=body, headers={"content-type": "application/json"})
        err = _assert_error(resp, 400)
        assert err["type"] == "invalid_request_error"
        if param is not None:
            assert err["param"] == param
        _assert_still_serving(h)


def test_completions_malformed_prompt_is_400(app) -> None:
    with app.http() as h:
        resp = h.post(
            "/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "max_tokens": 2}
        )
        _assert_error(resp, 400)
        resp = h.post("/v1/completions", json={"model": MODEL, "prompt": [10**9], "max_tokens": 2})
        _assert_error(resp, 400)
        _assert_still_serving(h)


def test_unknown_model_is_404(app) -> None:
    with app.http() as h:
        resp = h.post(CHAT, json=GOOD | {"model": "gpt-17"})
        err = _assert_error(resp, 404, "model_not_found")
        assert "gpt-17" in err["message"]
        _assert_still_serving(h)


def test_prompt_plus_max_tokens_beyond_context_is_400_naming_the_limit(app) -> None:
    limit = app.config.model.max_model_len
    with app.http() as h:
        resp = h.post(CHAT, json=GOOD | {"max_tokens": limit})
        err = _assert_error(resp, 400, "context_length_exceeded")
        assert str(limit) in err["message"]
        long_prompt = "hello " * (limit + 10)
        resp = h.post(
            "/v1/completions", json={"model": MODEL, "prompt": long_prompt, "max_tokens": 1}
        )
        err = _assert_error(resp, 400, "context_length_exceeded")
        assert str(limit) in err["message"]
        _assert_still_serving(h)


def test_saturated_server_answers_429_with_retry_after(app) -> None:
    """Hold MAX_PENDING long streams open, then one more request must be refused."""
    stop = threading.Event()
    opened = threading.Semaphore(0)

    def hold_stream() -> None:
        body = {
            "model": MODEL,
            "prompt": "Once upon a time",
            "max_tokens": 1500,
            "stream": True,
            "ignore_eos": True,
        }
        with (
            httpx.Client(base_url=app.url, timeout=300) as c,
            c.stream("POST", "/v1/completions", json=body) as r,
        ):
            opened.release()
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    threads = [threading.Thread(target=hold_stream, daemon=True) for _ in range(MAX_PENDING)]
    for t in threads:
        t.start()
    try:
        for _ in threads:
            assert opened.acquire(timeout=240), "the held streams did not start"
        with app.http() as h:
            resp = h.post(CHAT, json=GOOD)
            err = _assert_error(resp, 429, "rate_limit_exceeded")
            assert err["type"] == "rate_limit_error"
            assert int(resp.headers["retry-after"]) >= 1
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    # The dropped streams are aborted; the server serves again once they have been freed.
    deadline = time.monotonic() + 60
    with app.http() as h:
        while time.monotonic() < deadline:
            resp = h.post(CHAT, json=GOOD)
            if resp.status_code == 200:
                break
            time.sleep(1)
        assert resp.status_code == 200, resp.text


def test_errors_are_counted_in_metrics(app) -> None:
    before = total(app.metrics_text(), "inferos:request_errors_total", code="404")
    with app.http() as h:
        h.post(CHAT, json=GOOD | {"model": "nope"})
    after = total(app.metrics_text(), "inferos:request_errors_total", code="404")
    assert after == before + 1
