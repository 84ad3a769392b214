"""The API surface a vLLM client relies on, on the real app: /tokenize and /detokenize in
vLLM's shapes, /v1/models/{id}, /version, and fields we do not implement refused with a 400
naming them (client libraries' default values still accepted)."""

from __future__ import annotations

from importlib.metadata import version

import httpx
import openai
import pytest

from tests.integration.conftest import MODEL

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = {"role": "user", "content": "Say hi."}
GOOD_CHAT = {"model": MODEL, "messages": [USER], "max_tokens": 4}
GOOD_COMPLETION = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4}


def _error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param and param in err["message"]
    return err


# --------------------------------------------------------------------------- /tokenize


def test_tokenize_round_trips_through_detokenize(app) -> None:
    text = "Café naïve — 東京タワー 🚀 done."
    with app.http() as h:
        resp = h.post("/tokenize", json={"model": MODEL, "prompt": text})
        assert resp.status_code == 200, resp.text
        out = resp.json()
        assert set(out) == {"count", "max_model_len", "tokens", "token_strs"}
        assert out["count"] == len(out["tokens"]) > 0 and out["token_strs"] is None
        assert out["max_model_len"] == app.config.model.max_model_len
        back = h.post("/detokenize", json={"model": MODEL, "tokens": out["tokens"]})
        assert back.status_code == 200, back.text
        assert back.json() == {"prompt": text}


def test_tokenize_token_strings_and_no_model(app) -> None:
    with app.http() as h:
        out = h.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True})
        assert out.status_code == 200, out.text
        assert out.json()["token_strs"] == ["Hello", "Ġworld"]


def test_tokenize_messages_counts_the_chat_prompt(app) -> None:
    """/tokenize of messages gives the ids a chat request runs on: its count is the
    completion's usage.prompt_tokens, and detokenized it is the templated conversation."""
    messages = [{"role": "system", "content": "Be brief."}, USER]
    with app.http() as h:
        out = h.post("/tokenize", json={"model": MODEL, "messages": messages}).json()
        text = h.post("/detokenize", json={"tokens": out["tokens"]}).json()["prompt"]
    assert text.startswith("<|im_start|>system\nBe brief.") and text.endswith("assistant\n")
    chat = app.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert chat.usage.prompt_tokens == out["count"]


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/tokenize", {"model": "gpt-17", "prompt": "x"}, 404, "model"),
        ("/tokenize", {"model": MODEL}, 400, "prompt"),
        ("/tokenize", {"messages": [USER], "tools": [{"type": "function"}]}, 400,
         "tools.0.function"),
        ("/detokenize", {"model": "gpt-17", "tokens": [1]}, 404, "model"),
        ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
        ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    ],
)
def test_tokenize_errors_are_openai_shaped(app, path, body, status, param) -> None:
    with app.http() as h:
        err = _error(h.post(path, json=body), status)
        assert err["param"] == param


# --------------------------------------------------------------------------- models, version


def test_a_model_by_id_and_an_unknown_one(app) -> None:
    client = app.client()
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    assert card.model_dump() == client.models.list().data[0].model_dump()
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("org/gpt-17")  # a slash in the id is part of it
    assert e.value.body["code"] == "model_not_found"
    with app.http() as h:
        err = _error(h.get("/v1/models/org/gpt-17"), 404, "model")
        assert err["code"] == "model_not_found" and "org/gpt-17" in err["message"]


def test_version(app) -> None:
    with app.http() as h:
        resp = h.get("/version")
    assert resp.status_code == 200
    assert resp.json() == {"version": version("inferos-serve")}


# --------------------------------------------------------------------------- no silent drops


@pytest.mark.parametrize(
    "path, extra, param",
    [
        (CHAT, {"n": 33}, "n"),  # more choices than MAX_CHOICES
        (CHAT, {"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        (CHAT, {"echo": True}, "echo"),
        (CHAT, {"logit_bias": {"49152": 5}}, "logit_bias"),  # outside the vocabulary
        (CHAT, {"logprobs": True, "return_tokens_as_token_ids": True},
         "return_tokens_as_token_ids"),
        (COMPLETIONS, {"prompt_logprobs": 1}, "prompt_logprobs"),
        (COMPLETIONS, {"logprobs": 21}, "logprobs"),
        (CHAT, {"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        (CHAT, {"tool_choice": "auto"}, "tool_choice"),  # without tools
        (CHAT, {"response_format": {"type": "yaml"}}, "response_format"),
        (CHAT, {"best_of": 2}, "best_of"),
        (CHAT, {"structural_tag": "{}"}, "structural_tag"),
        (CHAT, {"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs"),
        (CHAT, {"stream": True, "stream_options": {"continuous_usage_stats": True}},
         "stream_options.continuous_usage_stats"),
        (COMPLETIONS, {"n": 40}, "n"),
        (COMPLETIONS, {"best_of": 2}, "best_of"),
        (COMPLETIONS, {"suffix": " The end."}, "suffix"),
        (COMPLETIONS, {"response_format": {"type": "json_schema"}}, "response_format"),
        (COMPLETIONS, {"guided_regex": "[0-9"}, "guided_regex"),
    ],
)  # fmt: skip
def test_an_unsupported_field_is_a_400_naming_it(app, path, extra, param) -> None:
    body = (GOOD_CHAT if path == CHAT else GOOD_COMPLETION) | extra
    with app.http() as h:
        err = _error(h.post(path, json=body), 400, param)
        assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "message, param",
    [
        ({"role": "function", "name": "get_weather", "content": "sunny"}, "messages.2.role"),
        ({"role": "assistant", "content": None,
          "function_call": {"name": "get_weather", "arguments": "{}"}},
         "messages.2.function_call"),
    ],
)  # fmt: skip
def test_deprecated_function_history_is_a_400_naming_the_message(app, message, param) -> None:
    messages = [USER, {"role": "assistant", "content": "Hi!"}, message, USER]
    with app.http() as h:
        _error(h.post(CHAT, json=GOOD_CHAT | {"messages": messages}), 400, param)


def test_the_openai_client_sees_the_refusal(app) -> None:
    client = app.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[USER], max_tokens=4, functions=[{"name": "f"}]
        )
    assert e.value.body["param"] == "functions" and "functions" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL,
            messages=[USER],
            max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "x"}},
        )
    assert e.value.body["param"] == "response_format"


def test_default_values_a_client_sends_are_accepted(app) -> None:
    client = app.client()
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[USER],
        max_tokens=4,
        n=1,
        logprobs=False,
        presence_penalty=0,
        frequency_penalty=0.0,
        logit_bias={},
        tool_choice="none",
        response_format={"type": "text"},
        parallel_tool_calls=False,  # no tools: nothing to call
        user="someone",
        extra_body={
            "repetition_penalty": 1.0,
            "min_p": 0.0,
            "best_of": 1,
            "top_logprobs": 0,
            "skip_special_tokens": True,
            "bad_words": [],
            "not_a_field_anywhere": {"x": 1},  # unknown: ignored, as vLLM does
        },
    )
    assert chat.choices[0].message.content and chat.usage.completion_tokens >= 1
    completion = client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=4,
        n=1,
        echo=False,
        best_of=1,
        presence_penalty=0,
        extra_body={"min_p": 0, "include_stop_str_in_output": False},
    )
    assert completion.usage.completion_tokens >= 1
