"""Issue 14, items 1 and 2 on the live app: a request with out-of-vocabulary token ids is a
400 and leaves the other requests alone; invalid text, unknown routes, wrong methods and
non-JSON bodies get OpenAI-shaped JSON errors; the error counters exist from the start; and
client errors never switch the server to its fallback."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import ray

from serving.api.errors import ERROR_STATUSES
from tests.integration.conftest import ADMIN_TOKEN, MODEL
from tests.integration.metrics_util import samples, total

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}
BAD_STOP = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Count to ten."}],
    "max_tokens": 8,
    "min_tokens": 2,
    "stop_token_ids": [1000000000],
}
SURROGATE = '"\\ud800"'  # a lone UTF-16 surrogate, as a JSON escape


def _assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param
    return err


def test_bad_stop_token_ids_are_400_while_8_good_requests_succeed(app) -> None:
    client = app.client()
    results: list[tuple[str | None, str]] = []
    failures: list[BaseException] = []
    started = threading.Barrier(9)

    def good(i: int) -> None:
        try:
            started.wait(timeout=60)
            stream = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"Tell me about the number {i}."}],
                max_tokens=24,
                stream=True,
            )
            text, reason = "", None
            for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    reason = chunk.choices[0].finish_reason or reason
            results.append((reason, text))
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=good, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    started.wait(timeout=60)
    time.sleep(0.5)  # the good ones are being prefilled / decoded now
    with app.http() as h:
        for body in (BAD_STOP, BAD_STOP | {"stream": True}):
            err = _assert_error(h.post(CHAT, json=body), 400, "stop_token_ids")
            assert err["type"] == "invalid_request_error"
            assert "1000000000" in err["message"]
        prompt = {"model": MODEL, "prompt": [1, 2, 10**9], "max_tokens": 2}
        _assert_error(h.post("/v1/completions", json=prompt), 400, "prompt")
    for t in threads:
        t.join(timeout=300)
    assert not failures, failures
    assert len(results) == 8
    assert all(reason in ("stop", "length") and text for reason, text in results), results


@pytest.mark.parametrize(
    "path, raw, param",
    [
        (CHAT, f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": {SURROGATE}}}]}}',
         "messages.0.content"),
        (CHAT, f'{{"model": {SURROGATE}, "messages": [{{"role": "user", "content": "hi"}}]}}',
         "model"),
        ("/v1/completions", f'{{"model": "{MODEL}", "prompt": {SURROGATE}, "max_tokens": 2}}',
         "prompt"),
        ("/v1/completions",
         f'{{"model": "{MODEL}", "prompt": "x", "stream": true, "stop": [{SURROGATE}]}}', "stop.0"),
    ],
)  # fmt: skip
def test_a_lone_surrogate_is_a_json_400(app, path: str, raw: str, param: str) -> None:
    with app.http() as h:
        err = _assert_error(h.post(path, content=raw.encode(), headers=JSON), 400, param)
        assert err["code"] == "invalid_text"


def test_unknown_route_wrong_method_and_non_json_bodies_are_openai_shaped(app) -> None:
    good = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    before = total(app.metrics_text(), "inferos:request_errors_total", code="415")
    with app.http() as h:
        err = _assert_error(h.get("/v1/no-such-route"), 404)
        assert err["code"] == "not_found"
        _assert_error(h.post("/v2/chat/completions", json=good), 404)
        resp = h.get(CHAT)
        err = _assert_error(resp, 405)
        assert err["code"] == "method_not_allowed"
        assert "POST" in resp.headers["allow"]
        _assert_error(h.delete("/v1/models"), 405)
        # what a web page can send cross-site without asking first: refused, nothing runs
        raw = json.dumps(good).encode()
        for path in (CHAT, "/v1/completions"):
            for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
                headers = {"content-type": ctype} if ctype else {}
                err = _assert_error(h.post(path, content=raw, headers=headers), 415)
                assert err["code"] == "unsupported_media_type"
        policy = h.get("/v1/policy").json()
        auth = {"authorization": f"Bearer {ADMIN_TOKEN}", "content-type": "text/plain"}
        _assert_error(h.post("/v1/policy", content=b'{"speculation": true}', headers=auth), 415)
        assert h.get("/v1/policy").json() == policy  # nothing changed
        # JSON still works, charset and all
        utf8_json = {"content-type": "application/json; charset=utf-8"}
        resp = h.post(CHAT, content=raw, headers=utf8_json)
        assert resp.status_code == 200, resp.text
    after = total(app.metrics_text(), "inferos:request_errors_total", code="415")
    assert after == before + 7


def test_request_errors_total_has_every_known_code_from_the_start(app) -> None:
    text = app.metrics_text()
    series = samples(text, "inferos:request_errors_total")
    codes = {labels["code"]: value for labels, value in series}
    assert set(codes) >= {str(s) for s in ERROR_STATUSES}, codes
    assert codes["500"] == 0  # nothing in these tests is the server's fault


def test_client_errors_do_not_trigger_the_fallback(app) -> None:
    def fallbacks() -> tuple[float, float]:
        text = app.metrics_text()
        return (
            total(text, "inferos:policy_fallbacks_total"),
            total(text, "inferos:policy_fallback_active"),
        )

    count_before, active_before = fallbacks()
    assert active_before == 0
    with app.http() as h:
        for i in range(20):
            body = BAD_STOP | {"stream": bool(i % 2)}
            _assert_error(h.post(CHAT, json=body), 400, "stop_token_ids")
        _assert_error(h.post(CHAT, json=BAD_STOP | {"model": "nope"}), 404)
        _assert_error(h.post(CHAT, content=b"{}", headers={"content-type": "text/plain"}), 415)
        time.sleep(1.0)  # many fast-loop periods (10 ms)
        good = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert h.post(CHAT, json=good).status_code == 200
        time.sleep(0.5)
    assert fallbacks() == (count_before, 0)
    snap = ray.get(app.scheduler().snapshot.remote())
    assert snap["control"]["fallback_active"] is False
