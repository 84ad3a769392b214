"""The API surface without servers: vLLM's /tokenize and /detokenize, and the table of
fields OpenAI or vLLM define that we refuse (400 naming the field) instead of ignoring."""

from __future__ import annotations

from typing import Any

import pytest

from serving.api.errors import BadRequest, UnknownModel
from serving.api.prepare import ModelInfo, prepare
from serving.api.protocol import ChatCompletionRequest, CompletionRequest
from serving.api.tokenize import detokenize, tokenize
from serving.api.unsupported import (
    UNSUPPORTED_FIELDS,
    Api,
    Unsupported,
    check_unsupported,
)

MODEL = "m"
USER = {"role": "user", "content": "Hello wörld 🚀"}

# A value that uses each field (the table's rows must each have one here).
USED: dict[str, Any] = {
    "best_of": 3,
    "echo": True,
    "suffix": "end",
    "functions": [{"name": "f"}],
    "function_call": "auto",
    "reasoning_effort": "low",
    "verbosity": "low",
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
    "store": True,
    "service_tier": "flex",
    "stream_options.continuous_usage_stats": True,
    "allowed_token_ids": [1, 2],
    "prompt_logprobs": 0,
    "return_tokens_as_token_ids": True,
    "skip_special_tokens": False,
    "truncate_prompt_tokens": 10,
    "use_beam_search": True,
    "structural_tag": "{}",
    "logits_processors": ["my.Processor"],
    "return_token_ids": True,
    "prompt_embeds": "AAAA",
    "priority": 1,
    "request_id": "mine",
    "cache_salt": "salt",
    "kv_transfer_params": {"do_remote_decode": True},
    "vllm_xargs": {"k": 1},
    "continue_final_message": True,
    "documents": [{"title": "t", "text": "x"}],
    "chat_template": "{{ messages }}",
    "chat_template_kwargs": {"enable_thinking": False},
}


def _base(api: Api) -> dict:
    if api is Api.COMPLETION:
        return {"model": MODEL, "prompt": "hi"}
    return {"model": MODEL, "messages": [USER]}


def _with(body: dict, dotted: str, value: Any) -> dict:
    head, _, rest = dotted.partition(".")
    if not rest:
        return body | {head: value}
    return body | {head: _with(body.get(head, {}), rest, value)}


def _cases() -> list[tuple[Unsupported, Api]]:
    return [(row, api) for row in UNSUPPORTED_FIELDS for api in sorted(row.apis, key=str)]


@pytest.fixture(scope="module")
def model(tokenizer, model_folder) -> ModelInfo:
    return ModelInfo.of(MODEL, 2048, tokenizer, model_folder)


# --------------------------------------------------------------------------- unsupported


def test_every_row_has_an_example_of_use() -> None:
    assert {row.field for row in UNSUPPORTED_FIELDS} == set(USED)


@pytest.mark.parametrize("row, api", _cases(), ids=lambda x: getattr(x, "field", str(x)))
def test_a_used_field_is_a_400_naming_it(row: Unsupported, api: Api) -> None:
    with pytest.raises(BadRequest) as e:
        check_unsupported(_with(_base(api), row.field, USED[row.field]), api)
    assert e.value.http_status == 400 and e.value.param == row.field
    assert f"`{row.field}`" in e.value.message and "leave it out" in e.value.message
    assert e.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("row, api", _cases(), ids=lambda x: getattr(x, "field", str(x)))
def test_null_and_the_no_op_values_are_accepted(row: Unsupported, api: Api) -> None:
    for value in (None, *row.unused):
        check_unsupported(_with(_base(api), row.field, value), api)


def test_the_request_models_defaults_change_nothing() -> None:
    """A modelled field's default must be a no-op value of its row, or a request that
    leaves the field out would be refused (or, the other way, a client's default would)."""
    for cls, api in ((ChatCompletionRequest, Api.CHAT), (CompletionRequest, Api.COMPLETION)):
        for row in UNSUPPORTED_FIELDS:
            info = cls.model_fields.get(row.field)
            if api in row.apis and info is not None:
                assert row.is_unused(info.default), (cls.__name__, row.field)


def test_json_true_is_not_1_nor_false_0() -> None:
    with pytest.raises(BadRequest):
        check_unsupported({"best_of": True}, Api.CHAT)
    with pytest.raises(BadRequest):
        check_unsupported({"skip_special_tokens": 1}, Api.CHAT)
    check_unsupported({"best_of": 1.0, "presence_penalty": 0.0, "min_p": 0}, Api.CHAT)


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {}}}]


def test_fields_only_one_api_defines_are_ignored_by_the_other() -> None:
    check_unsupported({"prompt": "x", "functions": USED["functions"]}, Api.COMPLETION)
    check_unsupported({"messages": [USER], "suffix": "x"}, Api.CHAT)


def test_a_client_librarys_defaults_are_accepted(tokenizer, model) -> None:
    chat_defaults = {
        "n": 1, "logprobs": False, "top_logprobs": 0, "echo": False, "presence_penalty": 0,
        "frequency_penalty": 0.0, "logit_bias": {}, "tool_choice": "none", "tools": [],
        "response_format": {"type": "text"}, "repetition_penalty": 1.0, "min_p": 0.0,
        "best_of": 1, "skip_special_tokens": True, "include_stop_str_in_output": False,
        "bad_words": [], "stream": True, "stream_options": {"include_usage": True,
        "continuous_usage_stats": False}, "parallel_tool_calls": True, "user": "u",
        "metadata": {"k": "v"}, "length_penalty": 1.0, "store": False, "priority": 0,
        "an_unknown_field": {"anything": 1},
    }  # fmt: skip
    p = prepare(_base(Api.CHAT) | chat_defaults | {"max_tokens": 4}, True, tokenizer, model)
    assert p.stream and p.include_usage and p.params.max_tokens == 4
    completion_defaults = {"n": 1, "echo": False, "logprobs": None, "best_of": 1, "suffix": None}
    prepare(_base(Api.COMPLETION) | completion_defaults, False, tokenizer, model)
    nulls = dict.fromkeys(("n", "logprobs", "echo", "presence_penalty", "frequency_penalty"))
    prepare(_base(Api.CHAT) | nulls, True, tokenizer, model)  # null is "left out", as in vLLM
    prepare(_base(Api.COMPLETION) | nulls, False, tokenizer, model)


@pytest.mark.parametrize(
    "message, param",
    [
        ({"role": "function", "name": "f", "content": "42"}, "messages.1.role"),
        ({"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
         "messages.1.function_call"),
    ],
)  # fmt: skip
def test_deprecated_function_history_is_refused_not_flattened(
    message: dict, param: str, tokenizer, model
):
    body = _base(Api.CHAT) | {"messages": [USER, message]}
    for call in (
        lambda: prepare(body, True, tokenizer, model),
        lambda: tokenize(body, tokenizer, model),
    ):
        with pytest.raises(BadRequest) as e:
            call()
        assert e.value.param == param and param in e.value.message


def test_assistant_messages_without_tool_calls_pass(tokenizer, model) -> None:
    history = [USER, {"role": "assistant", "content": "hi", "tool_calls": []}, USER]
    assert prepare(_base(Api.CHAT) | {"messages": history}, True, tokenizer, model).prompt_ids


def test_the_model_is_checked_before_the_fields(tokenizer, model) -> None:
    with pytest.raises(UnknownModel):
        prepare(_base(Api.CHAT) | {"model": "other", "n": 3}, True, tokenizer, model)


# --------------------------------------------------------------------------- /tokenize


def test_tokenize_a_prompt_in_vllms_shape(tokenizer, model) -> None:
    out = tokenize({"model": MODEL, "prompt": "Hello wörld 🚀"}, tokenizer, model)
    assert set(out) == {"count", "max_model_len", "tokens", "token_strs"}
    assert out["tokens"] == tokenizer.encode("Hello wörld 🚀")
    assert out["count"] == len(out["tokens"]) and out["max_model_len"] == 2048
    assert out["token_strs"] is None


def test_tokenize_returns_token_strings_when_asked(tokenizer, model) -> None:
    out = tokenize({"prompt": "Hello world", "return_token_strs": True}, tokenizer, model)
    assert out["token_strs"] == tokenizer.convert_ids_to_tokens(out["tokens"])
    assert out["token_strs"] == ["Hello", "Ġworld"]


def test_tokenize_messages_counts_what_a_chat_request_uses(tokenizer, model) -> None:
    messages = [{"role": "system", "content": "Be brief."}, USER]
    out = tokenize({"model": MODEL, "messages": messages}, tokenizer, model)
    chat = prepare({"model": MODEL, "messages": messages}, True, tokenizer, model)
    assert out["tokens"] == chat.prompt_ids and out["count"] == len(chat.prompt_ids)
    bare = tokenize({"messages": messages, "add_generation_prompt": False}, tokenizer, model)
    assert out["tokens"][: bare["count"]] == bare["tokens"] and bare["count"] < out["count"]


def test_add_special_tokens_is_passed_to_the_tokenizer(tokenizer, model) -> None:
    class Recording:
        def __init__(self) -> None:
            self.calls: list[bool] = []

        def __getattr__(self, name: str) -> Any:
            return getattr(tokenizer, name)

        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            self.calls.append(add_special_tokens)
            return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    rec = Recording()
    tokenize({"prompt": "x"}, rec, model)  # type: ignore[arg-type]
    tokenize({"prompt": "x", "add_special_tokens": False}, rec, model)  # type: ignore[arg-type]
    tokenize({"messages": [USER]}, rec, model)  # type: ignore[arg-type]
    tokenize({"messages": [USER], "add_special_tokens": True}, rec, model)  # type: ignore[arg-type]
    assert rec.calls == [True, False, False, True]  # vLLM's defaults: prompt on, chat off


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": MODEL}, "prompt"),
        ({"prompt": "a", "messages": [USER]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"messages": []}, "messages"),
        ({"messages": [USER], "tools": [{"type": "function"}]}, "tools.0.function"),
        ({"messages": [USER], "chat_template": "{{ x }}"}, "chat_template"),
        ({"messages": [USER], "continue_final_message": True}, "continue_final_message"),
    ],
)
def test_tokenize_refuses_what_it_cannot_do(body: dict, param: str, tokenizer, model) -> None:
    with pytest.raises(BadRequest) as e:
        tokenize(body, tokenizer, model)
    assert e.value.http_status == 400 and e.value.param == param


def test_tokenize_and_detokenize_refuse_another_model(tokenizer, model) -> None:
    with pytest.raises(UnknownModel):
        tokenize({"model": "other", "prompt": "x"}, tokenizer, model)
    with pytest.raises(UnknownModel):
        detokenize({"model": "other", "tokens": [1]}, tokenizer, model)


# --------------------------------------------------------------------------- /detokenize


def test_detokenize_round_trips_a_prompt(tokenizer, model) -> None:
    text = "Café naïve — 東京タワー 🚀 done."
    ids = tokenize({"prompt": text}, tokenizer, model)["tokens"]
    assert detokenize({"model": MODEL, "tokens": ids}, tokenizer, model) == {"prompt": text}
    assert detokenize({"tokens": []}, tokenizer, model) == {"prompt": ""}


def test_detokenize_keeps_the_templates_special_tokens(tokenizer, model) -> None:
    ids = tokenize({"messages": [USER]}, tokenizer, model)["tokens"]
    text = detokenize({"tokens": ids}, tokenizer, model)["prompt"]
    assert text == tokenizer.apply_chat_template([USER], add_generation_prompt=True, tokenize=False)
    assert text.count("<|im_start|>") == 3


@pytest.mark.parametrize(
    "tokens, param", [([49152], "tokens"), ([1, -1], "tokens"), ([2**70], "tokens"),
                      (["a"], "tokens.0"), (None, "tokens")],
)  # fmt: skip
def test_detokenize_refuses_ids_outside_the_vocabulary(tokens, param, tokenizer, model) -> None:
    with pytest.raises(BadRequest) as e:
        detokenize({"tokens": tokens}, tokenizer, model)
    assert e.value.param == param
