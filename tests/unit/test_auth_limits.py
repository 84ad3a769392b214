"""API keys and request size limits without servers (issue 14, items 3-4): every route but the
public ones needs one of several keys (or the admin token) in the Bearer form; oversized
headers are 431 and oversized bodies 413, declared or chunked, before the route parses them;
client-chosen session ids stay bounded in length."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from deployments.sessions import session_id
from serving.api.auth import ApiKeyAuth, Auth, bearer_token
from serving.api.http_errors import install_error_handlers
from serving.api.limits import MAX_ID_CHARS, Limits, RequestLimits, bounded_id
from serving.api.protocol import read_json_body
from serving.config import DEFAULT_PUBLIC_PATHS, MIN_BODY_BYTES, InferosConfig
from serving.metrics import FrontendMetrics

KEYS = ("key-one", "key-two")
ADMIN = "admin-secret"
BODY_LIMIT = 1000


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestLimits)
    app.add_middleware(ApiKeyAuth)
    app.state.auth = Auth.of(KEYS, ADMIN, DEFAULT_PUBLIC_PATHS)
    app.state.request_limits = Limits(BODY_LIMIT, 4096)
    app.state.metrics = FrontendMetrics("m", "r")
    app.state.reads = 0

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/console/app.js")
    async def script() -> dict:
        return {}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"data": []}

    @app.post("/v1/echo")
    async def echo(request: Request) -> dict:
        body = await read_json_body(request)
        request.app.state.reads += 1
        return {"size": len(body.get("text", ""))}

    return app


@pytest.fixture
def client() -> TestClient:
    return TestClient(_app(), raise_server_exceptions=False)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ------------------------------------------------------------------------------- API keys
def test_every_key_and_the_admin_token_open_a_guarded_route(client: TestClient) -> None:
    for token in (*KEYS, ADMIN):
        assert client.get("/v1/models", headers=_bearer(token)).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{}, _bearer("key-three"), _bearer("key-one-and-more"), {"Authorization": "key-one"},
     {"Authorization": "Basic key-one"}, _bearer("")],
)  # fmt: skip
def test_a_missing_wrong_or_unbearered_key_is_401(client: TestClient, headers: dict) -> None:
    resp = client.get("/v1/models", headers=headers)
    assert resp.status_code == 401
    err = resp.json()["error"]
    assert err["code"] == "invalid_api_key" and err["type"] == "authentication_error"


def test_the_key_is_checked_before_the_body_is_read(client: TestClient) -> None:
    resp = client.post("/v1/echo", json={"text": "hi"})
    assert resp.status_code == 401
    assert client.app.state.reads == 0


def test_public_paths_need_no_key(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/console/app.js").status_code == 200
    assert client.get("/v1/models").status_code == 401  # not under a public subtree


def test_no_keys_configured_leaves_every_route_open() -> None:
    app = _app()
    app.state.auth = Auth.of([], ADMIN, DEFAULT_PUBLIC_PATHS)
    assert TestClient(app).get("/v1/models").status_code == 200


def test_bearer_token_needs_the_bearer_scheme() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"  # the scheme is case-insensitive (RFC 7235)
    assert bearer_token("abc") is None
    assert bearer_token("Token abc") is None
    assert bearer_token(None) is None


def test_config_takes_one_key_or_several() -> None:
    assert InferosConfig.model_validate({"server": {"api_key": "k"}}).api_keys == ["k"]
    both = InferosConfig.model_validate({"server": {"api_key": ["a", "b"]}})
    assert both.api_keys == ["a", "b"]
    assert InferosConfig().api_keys == []


# ---------------------------------------------------------------------------- size limits
def test_a_declared_oversized_body_is_413_before_the_route_reads_it(client: TestClient) -> None:
    resp = client.post("/v1/echo", json={"text": "x" * 2000}, headers=_bearer("key-one"))
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"
    assert client.app.state.reads == 0


def test_an_undeclared_oversized_body_is_413_while_it_is_read(client: TestClient) -> None:
    def chunks():  # no Content-Length: sent chunked
        yield b'{"text": "'
        for _ in range(30):
            yield b"x" * 100
        yield b'"}'

    resp = client.post(
        "/v1/echo",
        content=chunks(),
        headers={**_bearer("key-one"), "Content-Type": "application/json"},
    )
    assert resp.status_code == 413
    assert client.app.state.reads == 0


def test_a_body_within_the_limit_passes(client: TestClient) -> None:
    resp = client.post("/v1/echo", json={"text": "x" * 500}, headers=_bearer("key-one"))
    assert resp.status_code == 200 and resp.json() == {"size": 500}


def test_oversized_headers_are_431(client: TestClient) -> None:
    resp = client.get("/health", headers={"X-Session-Id": "s" * 5000})
    assert resp.status_code == 431
    assert resp.json()["error"]["code"] == "request_header_fields_too_large"


def test_limit_errors_are_counted() -> None:
    app = _app()
    client = TestClient(app)
    client.get("/health", headers={"X-Big": "b" * 5000})
    client.post("/v1/echo", json={"text": "x" * 2000}, headers=_bearer("key-one"))
    text = app.state.metrics.exposition()
    assert 'code="431"' in text and 'code="413"' in text


def test_the_default_body_limit_follows_the_context() -> None:
    assert InferosConfig().max_body_bytes == MIN_BODY_BYTES  # 2048 tokens: the 1 MiB floor
    long = InferosConfig.model_validate({"model": {"max_model_len": 16384}})
    assert long.max_body_bytes == 64 * 16384
    fixed = InferosConfig.model_validate({"server": {"max_body_bytes": 12345}})
    assert fixed.max_body_bytes == 12345


# ---------------------------------------------------------------------------- session ids
class _Prepared:
    def __init__(self, user: str | None) -> None:
        self.user = user
        self.conversation_start = "abc"


def test_long_session_ids_are_hashed_to_a_bounded_length() -> None:
    long = "s" * (4 << 20)
    sid = session_id({"x-session-id": long}, _Prepared(None))
    assert len(sid) <= MAX_ID_CHARS + 2
    assert sid == session_id({"x-session-id": long}, _Prepared(None))  # stable: affinity holds
    assert sid != session_id({"x-session-id": long + "t"}, _Prepared(None))
    assert len(session_id({}, _Prepared("u" * 100_000))) <= MAX_ID_CHARS + 2
    assert session_id({"x-session-id": "short"}, _Prepared(None)) == "h:short"
    assert bounded_id("\ud800" * 200).startswith("sha256:")  # any str hashes, even invalid text
