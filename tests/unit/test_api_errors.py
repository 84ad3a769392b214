"""Request validation and error rendering without servers: JSON bodies (415, invalid text),
token ids against the vocabulary, OpenAI-shaped 404/405/500, and the error counters."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serving.api.errors import (
    ERROR_STATUSES,
    BadRequest,
    InvalidText,
    RequestTimeout,
    ServeError,
    TooManyRequests,
    Unavailable,
    UnknownModel,
    UnsupportedMediaType,
    is_server_fault,
)
from serving.api.http_errors import ErrorResponse, install_error_handlers
from serving.api.prepare import ModelInfo, prepare
from serving.api.protocol import lone_surrogate_at, parse_json_body
from serving.api.responses import sse_error
from serving.metrics import FrontendMetrics, merge_expositions

MODEL = "m"
JSON = "application/json"
SURROGATE = b'"\\ud800"'  # how a client's JSON carries a lone UTF-16 surrogate


def _chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]} | fields


def _errors(text: str) -> dict[str, float]:
    prefix = "inferos:request_errors_total{"
    out = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            labels, value = line[len(prefix) :].split("} ")
            code = next(p for p in labels.split(",") if p.startswith("code="))
            out[code.split('"')[1]] = float(value)
    return out


# --------------------------------------------------------------------------- JSON bodies


@pytest.mark.parametrize(
    "content_type",
    [None, "", "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
     "multipart/form-data; boundary=x", "application/jsonp"],
)  # fmt: skip
def test_a_body_not_declared_json_is_415(content_type: str | None) -> None:
    with pytest.raises(UnsupportedMediaType) as e:
        parse_json_body(json.dumps(_chat()).encode(), content_type)
    assert e.value.http_status == 415
    assert "application/json" in e.value.message


@pytest.mark.parametrize(
    "content_type",
    [JSON, "application/json; charset=utf-8", "Application/JSON", "application/vnd.x+json"],
)
def test_json_media_types_are_accepted(content_type: str) -> None:
    assert parse_json_body(json.dumps(_chat()).encode(), content_type) == _chat()


@pytest.mark.parametrize("raw", [b"{nope", b"\xff\xfe{", b"[1]", b'"text"'])
def test_bad_json_is_400(raw: bytes) -> None:
    with pytest.raises(BadRequest) as e:
        parse_json_body(raw, JSON)
    assert e.value.http_status == 400


@pytest.mark.parametrize(
    "raw, param",
    [
        (b'{"model": "m", "messages": [{"role": "user", "content": ' + SURROGATE + b"}]}",
         "messages.0.content"),
        (b'{"model": ' + SURROGATE + b', "messages": []}', "model"),
        (b'{"model": "m", "prompt": ' + SURROGATE + b"}", "prompt"),
        (b'{"model": "m", "prompt": ["a", ' + SURROGATE + b"]}", "prompt.1"),
        (b'{"model": "m", "stop": ["x", "\\udfff tail"]}', "stop.1"),
    ],
)  # fmt: skip
def test_a_lone_surrogate_is_400_naming_the_field(raw: bytes, param: str) -> None:
    with pytest.raises(InvalidText) as e:
        parse_json_body(raw, JSON)
    assert e.value.http_status == 400
    assert e.value.param == param
    json.dumps(e.value.body()).encode("utf-8")  # the message itself encodes


def test_a_surrogate_pair_is_one_character_and_fine() -> None:
    body = parse_json_body(b'{"model": "m", "prompt": "\\ud83d\\ude00"}', JSON)
    assert body["prompt"] == "😀"
    assert lone_surrogate_at({"a": [{"b": "ok"}], "\ud800": 1}) == ""  # a key counts too
    assert lone_surrogate_at({"a": [1, 2.0, None, True, "ok"]}) is None


# --------------------------------------------------------------------------- prepare


@pytest.fixture(scope="module")
def model(tokenizer, model_folder) -> ModelInfo:
    return ModelInfo.of(MODEL, 2048, tokenizer, model_folder)


def test_vocabulary_is_what_tokenizer_and_model_share(model: ModelInfo, tokenizer, model_folder):
    config = json.loads((model_folder / "config.json").read_text())
    assert model.vocab_size == min(len(tokenizer), config["vocab_size"]) == 49152


@pytest.mark.parametrize("ids", [[10**9], [49152], [-1], [5, 2**70]])
def test_stop_token_ids_outside_the_vocabulary_are_400(ids, tokenizer, model) -> None:
    with pytest.raises(BadRequest) as e:
        prepare(_chat(min_tokens=2, stop_token_ids=ids), True, tokenizer, model)
    assert e.value.http_status == 400
    assert e.value.param == "stop_token_ids"
    assert "49151" in e.value.message  # says what is valid


def test_stop_token_ids_inside_the_vocabulary_pass(tokenizer, model) -> None:
    p = prepare(_chat(min_tokens=2, stop_token_ids=[0, 49151]), True, tokenizer, model)
    assert p.params.stop_token_ids == (0, 49151)
    assert p.params.min_tokens == 2


@pytest.mark.parametrize("prompt", [[10**9], [1, -5], [[3, 49152]]])
def test_prompt_ids_outside_the_vocabulary_are_400(prompt, tokenizer, model) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    with pytest.raises(BadRequest) as e:
        prepare(body, False, tokenizer, model)
    assert e.value.param == "prompt"


def test_prompt_ids_inside_the_vocabulary_pass(tokenizer, model) -> None:
    p = prepare({"model": MODEL, "prompt": [1, 2, 49151], "max_tokens": 2}, False, tokenizer, model)
    assert p.prompt_ids == [1, 2, 49151]
    assert p.req_id.startswith("cmpl-")


def test_logit_bias_outside_the_vocabulary_is_refused(tokenizer, model) -> None:
    with pytest.raises(BadRequest) as e:
        prepare(_chat(logit_bias={"49152": -100}), True, tokenizer, model)
    assert e.value.param == "logit_bias" and "49151" in e.value.message
    assert prepare(_chat(logit_bias={"15": -100}), True, tokenizer, model).params.logit_bias
    assert prepare(_chat(logit_bias={}), True, tokenizer, model).prompt_ids  # empty is fine


def test_unknown_model_is_404_and_a_long_name_is_not_echoed_whole(tokenizer, model) -> None:
    with pytest.raises(UnknownModel) as e:
        prepare(_chat(model="x" * 10_000), True, tokenizer, model)
    assert e.value.http_status == 404
    assert len(e.value.message) < 300


def test_field_errors_name_the_field(tokenizer, model) -> None:
    with pytest.raises(BadRequest) as e:
        prepare(_chat(stop_token_ids=["a"]), True, tokenizer, model)
    assert e.value.param == "stop_token_ids.0"


def test_a_good_chat_request_is_prepared(tokenizer, model) -> None:
    p = prepare(_chat(max_tokens=4, stream=True), True, tokenizer, model)
    assert p.req_id.startswith("chatcmpl-") and p.stream
    assert p.params.max_tokens == 4 and p.prompt_ids


# --------------------------------------------------------------------------- HTTP errors


def _app() -> tuple[TestClient, FrontendMetrics]:
    app = FastAPI()
    install_error_handlers(app)
    metrics = FrontendMetrics(MODEL, "r")
    app.state.metrics = metrics

    @app.post("/v1/boom")
    async def boom() -> dict:
        raise RuntimeError("secret internals at /opt/serving/engine.py line 42")

    @app.post("/v1/busy")
    async def busy() -> dict:
        raise TooManyRequests("at the limit")

    @app.get("/v1/only-get")
    async def only_get() -> dict:
        return {}

    @app.get("/v1/typed")
    async def typed(n: int) -> dict:
        return {"n": n}

    return TestClient(app, raise_server_exceptions=True), metrics


def _shape(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_unexpected_exception_is_a_json_500_without_internals() -> None:
    client, metrics = _app()
    err = _shape(client.post("/v1/boom"), 500)
    assert err["type"] == "internal_server_error" and err["code"] == "internal_error"
    assert "secret" not in err["message"] and "error id" in err["message"]
    assert _errors(metrics.exposition())["500"] == 1


def test_unknown_route_and_wrong_method_are_openai_shaped() -> None:
    client, metrics = _app()
    err = _shape(client.get("/v1/nope"), 404)
    assert err["code"] == "not_found" and "/v1/nope" in err["message"]
    resp = client.post("/v1/only-get")
    err = _shape(resp, 405)
    assert err["code"] == "method_not_allowed"
    assert resp.headers["allow"] == "GET"
    counts = _errors(metrics.exposition())
    assert counts["404"] == 1 and counts["405"] == 1


def test_fastapi_validation_errors_are_400_naming_the_parameter() -> None:
    client, _ = _app()
    err = _shape(client.get("/v1/typed?n=many"), 400)
    assert err["param"] == "query.n" and err["type"] == "invalid_request_error"


def test_serve_errors_keep_their_status_and_retry_after() -> None:
    client, _ = _app()
    resp = client.post("/v1/busy")
    err = _shape(resp, 429)
    assert err["code"] == "rate_limit_exceeded"
    assert resp.headers["retry-after"] == "1"


def test_error_response_encodes_any_text() -> None:
    body = ServeError("bad \ud800 text").body()
    raw = ErrorResponse(body, status_code=400).body
    assert json.loads(raw)["error"]["message"] == "bad \ud800 text"


def test_an_sse_error_event_carries_the_http_status_as_its_code() -> None:
    err = Unavailable("decode failed")
    line = sse_error(err.message, err.error_type, err.http_status)
    assert line.startswith("data: ") and line.endswith("\n\n")
    body = json.loads(line.removeprefix("data: "))["error"]
    assert body == {"message": "decode failed", "type": "service_unavailable", "param": None,
                    "code": 503}  # fmt: skip


def test_only_server_faults_count_against_the_error_rate() -> None:
    assert not is_server_fault(BadRequest("x"))
    assert not is_server_fault(UnknownModel("x"))
    assert not is_server_fault(TooManyRequests("x"))
    assert not is_server_fault(UnsupportedMediaType("x"))
    assert not is_server_fault(RequestTimeout("x"))
    assert is_server_fault(Unavailable("x"))
    assert is_server_fault(RuntimeError("x"))


def test_every_error_status_is_exported_at_zero_from_the_start() -> None:
    text = merge_expositions([FrontendMetrics(MODEL, "r").exposition()])
    counts = _errors(text)
    assert counts == {str(s): 0.0 for s in ERROR_STATUSES}
    assert {"400", "404", "415", "429", "500", "503"} <= set(counts)


def test_the_ingress_app_answers_every_error_in_json() -> None:
    """The real ingress FastAPI app, outside Serve: its routes fail unexpectedly (no replica
    context, no control API attached), which must still be JSON 500s."""
    from deployments.ingress import app

    client = TestClient(app)
    _shape(client.get("/v1/nope"), 404)
    assert _shape(client.get("/v1/chat/completions"), 405)["code"] == "method_not_allowed"
    for resp in (client.post("/v1/chat/completions", json={}), client.get("/v1/policy")):
        err = _shape(resp, 500)
        assert "error id" in err["message"] and "Serve" not in err["message"]
