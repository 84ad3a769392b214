"""Property-based fuzzing of the live API (issue 14): requests built by hypothesis from the
fields OpenAI and vLLM define, each either plausible or any JSON value, plus raw bodies,
odd content types and odd routes. Whatever comes in, the answer is never a 5xx, every error
is OpenAI-shaped JSON, and the server is healthy and serves normally afterwards."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import MODEL

pytestmark = pytest.mark.integration

EXAMPLES = 120

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)  # fmt: skip
texts = st.text(max_size=40) | st.sampled_from(["\ud800", "a\udfffb", "", " ", "\x00", "🙂" * 5])
small_counts = st.integers(-3, 8)  # generation stays short: the fuzzing is of the input


def _field(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """A field's value: usually plausible, sometimes any JSON at all."""
    return st.one_of(plausible, plausible, json_values)


messages = st.lists(
    st.fixed_dictionaries(
        {"role": _field(st.sampled_from(["user", "system", "assistant", "tool", "developer"])),
         "content": _field(texts | st.lists(st.fixed_dictionaries(
             {"type": st.sampled_from(["text", "image_url"]), "text": texts}), max_size=2))},
        optional={"name": _field(texts), "tool_calls": json_values},
    ),
    max_size=4,
)  # fmt: skip

COMMON = {
    "model": _field(st.sampled_from([MODEL, "other-model", ""]) | texts),
    "max_tokens": _field(small_counts | st.sampled_from([0, 10**9])),
    "temperature": _field(st.floats(-1, 3)),
    "top_p": _field(st.floats(-0.5, 1.5)),
    "top_k": _field(st.integers(-2, 100)),
    "min_tokens": _field(small_counts),
    "seed": _field(st.integers(-(2**63), 2**64)),
    "stop": _field(texts | st.lists(texts, max_size=3)),
    "stop_token_ids": _field(st.lists(st.integers(-5, 10**9), max_size=3)),
    "stream": _field(st.booleans()),
    "stream_options": _field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "ignore_eos": _field(st.booleans()),
    "n": _field(st.integers(-1, 3)),
    "logprobs": json_values,
    "user": _field(texts),
}
chat_bodies = st.fixed_dictionaries({"messages": _field(messages)}, optional=COMMON)
completion_bodies = st.fixed_dictionaries(
    {"prompt": _field(
        texts | st.lists(st.integers(-5, 10**6), max_size=5) | st.lists(texts, max_size=2)
    )},
    optional=COMMON | {"echo": _field(st.booleans()), "suffix": _field(texts)},
)  # fmt: skip
requests = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), chat_bodies),
    st.tuples(st.just("/v1/completions"), completion_bodies),
    st.tuples(
        st.sampled_from(["/tokenize", "/detokenize"]),
        st.dictionaries(st.sampled_from(["model", "prompt", "messages", "tokens"]), json_values),
    ),
)  # fmt: skip
content_types = st.sampled_from(
    ["application/json", "application/json; charset=utf-8", "text/plain", "", None]
)


def _check(status: int, body: bytes, what: object) -> None:
    assert status < 500, (status, body[:500], what)
    if status >= 400:
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "param", "code"}, (err, what)


def _post(http: httpx.Client, path: str, raw: bytes, content_type: str | None) -> tuple[int, bytes]:
    """Status and body of a POST; an error inside a 200 stream must carry a 4xx code."""
    headers = {} if content_type is None else {"content-type": content_type}
    with http.stream("POST", path, content=raw, headers=headers) as resp:
        body = b"".join(resp.iter_bytes())
        streamed = resp.headers.get("content-type", "").startswith("text/event-stream")
    if resp.status_code == 200 and streamed:
        for line in body.decode().splitlines():
            if line.startswith("data: {") and '"error"' in line:
                code = json.loads(line[6:])["error"]["code"]
                assert not (isinstance(code, int) and code >= 500), line
    return resp.status_code, body


@pytest.fixture(scope="module")
def http(apps) -> httpx.Client:
    with httpx.Client(base_url=apps.get().url, timeout=120) as client:
        yield client


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(request=requests, content_type=content_types)
def test_fuzzed_json_requests_never_get_a_5xx(http: httpx.Client, request, content_type) -> None:
    path, body = request
    raw = json.dumps(body, allow_nan=True).encode()  # NaN and Infinity too: json.loads reads them
    _check(*_post(http, path, raw, content_type), (path, body, content_type))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/tokenize", "/v1/policy"]),
    raw=st.binary(max_size=200)
    | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
)  # fmt: skip
def test_fuzzed_raw_bodies_never_get_a_5xx(http: httpx.Client, path: str, raw: bytes) -> None:
    _check(*_post(http, path, raw, "application/json"), (path, raw))


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    path=st.sampled_from(["/", "/v1", "/v1/models", "/v1/models/x%2Fy", "/health", "/metrics",
                          "/v1/chat/completions", "/tokenize", "/version", "/../etc/passwd",
                          "/console/../../pyproject.toml", "/v1/models/" + "a" * 3000]),
)  # fmt: skip
def test_fuzzed_routes_never_get_a_5xx(http: httpx.Client, method: str, path: str) -> None:
    resp = http.request(method, path)
    assert resp.status_code < 500, (method, path, resp.status_code, resp.text[:300])


def test_the_server_is_healthy_and_serves_after_the_fuzzing(app, http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    out = app.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4
    )
    assert out.choices[0].message.content
