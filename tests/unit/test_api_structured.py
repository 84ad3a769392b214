"""The API side of structured output and tool calling, without servers: request fields →
the spec in SamplingParams (400s naming the field), tool_choice → grammar and parser, the
conversation the template receives, and tool calls read out of answers whole and
streamed in OpenAI's shapes."""

from __future__ import annotations

import json

import pytest

from serving.api.errors import BadRequest
from serving.api.prepare import ModelInfo, PrepareOptions, prepare
from serving.api.responses import ResponseBuilder, Usage
from serving.structured.request import InvalidStructuredOutput
from serving.structured.spec import StructuredKind, StructuredSpec

MODEL = "m"
USER = {"role": "user", "content": "What is the weather in Paris?"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}  # fmt: skip
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.fixture(scope="module")
def model(tokenizer, model_folder) -> ModelInfo:
    return ModelInfo.of(MODEL, 2048, tokenizer, model_folder)


def _chat(tokenizer, model, options: PrepareOptions = PrepareOptions(), **fields):
    return prepare({"model": MODEL, "messages": [USER]} | fields, True, tokenizer, model, options)


def _refused(call, param: str) -> str:
    with pytest.raises(BadRequest) as e:
        call()
    assert e.value.http_status == 400 and e.value.param == param, (e.value.param, param)
    return e.value.message


# --------------------------------------------------------------------------- structured


def test_each_field_becomes_the_spec(tokenizer, model) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, "strict": True}}
    cases = [
        ({"response_format": rf}, StructuredSpec.json_schema(SCHEMA)),
        ({"response_format": {"type": "json_object"}}, StructuredSpec.json_object()),
        ({"response_format": {"type": "text"}}, None),
        ({"structured_outputs": {"regex": "[0-9]+"}}, StructuredSpec.regex("[0-9]+")),
        ({"structured_outputs": {"choice": ["a", "b"]}}, StructuredSpec.choice(["a", "b"])),
        ({"guided_json": SCHEMA}, StructuredSpec.json_schema(SCHEMA)),
        ({"guided_choice": ["a", "b"]}, StructuredSpec.choice(["a", "b"])),
        ({"guided_regex": "x+"}, StructuredSpec.regex("x+")),
        ({}, None),
    ]
    for fields, spec in cases:
        assert _chat(tokenizer, model, **fields).params.structured == spec, fields
    completion = prepare(
        {"model": MODEL, "prompt": "n:", "structured_outputs": {"regex": "[0-9]+"}},
        False, tokenizer, model,
    )  # fmt: skip
    assert completion.params.structured == StructuredSpec.regex("[0-9]+")


def test_bad_fields_are_400s_naming_them(tokenizer, model) -> None:
    bad_schema = {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": 5}}}
    message = _refused(lambda: _chat(tokenizer, model, response_format=bad_schema),
                       "response_format")  # fmt: skip
    assert "response_format.json_schema.schema" in message
    _refused(lambda: _chat(tokenizer, model, structured_outputs={"regex": "("}),
             "structured_outputs")  # fmt: skip
    message = _refused(lambda: _chat(tokenizer, model, guided_regex="("), "guided_regex")
    assert message.startswith("guided_regex") and "structured_outputs" not in message
    _refused(
        lambda: _chat(tokenizer, model, structured_outputs={"regex": "a"}, guided_regex="b"),
        "structured_outputs",
    )
    _refused(lambda: _chat(tokenizer, model, response_format={"type": "yaml"}),
             "response_format")  # fmt: skip


def test_the_engines_refusal_is_a_400_too(tokenizer, model) -> None:
    def refuse(spec: StructuredSpec) -> object:
        raise InvalidStructuredOutput("grammar: unsupported thing")

    options = PrepareOptions(compile_check=refuse)
    message = _refused(
        lambda: _chat(tokenizer, model, options, structured_outputs={"grammar": "start: x"}),
        "structured_outputs",
    )
    assert "unsupported thing" in message
    _refused(lambda: _chat(tokenizer, model, options, tools=[WEATHER], tool_choice="required"),
             "tools")  # fmt: skip


# --------------------------------------------------------------------------- tool choice


def test_named_and_required_choices_are_grammars(tokenizer, model) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    p = _chat(tokenizer, model, tools=[WEATHER, TIME], tool_choice=named)
    assert p.params.structured == StructuredSpec.json_schema(WEATHER["function"]["parameters"])
    p = _chat(tokenizer, model, tools=[WEATHER, TIME], tool_choice="required")
    spec = p.params.structured
    assert spec is not None and spec.kind is StructuredKind.JSON_SCHEMA
    schema = spec.schema()
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    names = [c["properties"]["name"]["enum"] for c in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    one = _chat(tokenizer, model, tools=[WEATHER], tool_choice="required",
                parallel_tool_calls=False).params.structured  # fmt: skip
    assert one is not None and one.schema()["maxItems"] == 1
    for choice in ("auto", "none", None):
        p = _chat(tokenizer, model, tools=[WEATHER], tool_choice=choice)
        assert p.params.structured is None


def test_tool_choice_errors(tokenizer, model) -> None:
    named = {"type": "function", "function": {"name": "nope"}}
    assert "get_weather" in _refused(
        lambda: _chat(tokenizer, model, tools=[WEATHER], tool_choice=named), "tool_choice"
    )
    _refused(lambda: _chat(tokenizer, model, tool_choice="required"), "tool_choice")
    _refused(lambda: _chat(tokenizer, model, tools=[WEATHER, WEATHER]), "tools")
    _refused(
        lambda: _chat(tokenizer, model, tools=[WEATHER], tool_choice="required",
                      response_format={"type": "json_object"}),
        "tool_choice",
    )  # fmt: skip
    no_auto = PrepareOptions(enable_auto_tool_choice=False)
    _refused(lambda: _chat(tokenizer, model, no_auto, tools=[WEATHER]), "tool_choice")
    assert _chat(tokenizer, model, no_auto, tools=[WEATHER], tool_choice="required")


def test_tools_and_tool_history_reach_the_prompt(tokenizer, model) -> None:
    """SmolLM2's template knows no tools: they go into the system message, the history's
    calls and results into the text, in the Hermes format the parser reads."""
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}  # fmt: skip
    history = [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temperature": 21}'},
        USER,
    ]
    p = prepare({"model": MODEL, "messages": history, "tools": [WEATHER]}, True, tokenizer, model)
    text = tokenizer.decode(p.prompt_ids)
    assert "<tools>" in text and '"name": "get_weather"' in text
    rome = '{"name": "get_weather", "arguments": {"city": "Rome"}}'
    assert f"<tool_call>\n{rome}\n</tool_call>" in text
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in text
    assert p.tool_output is not None and p.tool_output.plan.mode == "auto"
    plain = _chat(tokenizer, model)
    assert "<tools>" not in tokenizer.decode(plain.prompt_ids) and plain.tool_output is None


def test_a_template_that_takes_tools_gets_them_as_fields(tokenizer, model) -> None:
    class Recording:
        chat_template = "{{ tools }} {{ messages }} tool_calls"

        def __init__(self) -> None:
            self.seen: dict = {}

        def __getattr__(self, name: str):
            return getattr(tokenizer, name)

        def apply_chat_template(self, conversation, **kw):
            self.seen = {"messages": conversation, "tools": kw.get("tools")}
            return "x"

    rec = Recording()
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}  # fmt: skip
    history = [USER, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "21"}]
    prepare({"model": MODEL, "messages": history, "tools": [WEATHER]}, True, rec, model)
    assert rec.seen["tools"][0]["function"]["name"] == "get_weather"
    assistant, tool = rec.seen["messages"][1:]
    assert assistant["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}  # an object
    assert tool == {"role": "tool", "content": "21", "tool_call_id": "c1", "name": "get_weather"}


# --------------------------------------------------------------------------- answers


def _output(tokenizer, model, **fields):
    p = _chat(tokenizer, model, tools=[WEATHER, TIME], **fields)
    assert p.tool_output is not None
    return p.tool_output


def _streamed(output, text: str, reason: str, cut: int = 3):
    pieces = []
    for i in range(0, len(text), cut):
        pieces += output.feed(text[i : i + cut])
    rest, reason = output.finish(reason)
    pieces += rest
    content = "".join(p.get("content", "") for p in pieces) or None
    calls: dict[int, dict] = {}
    for p in pieces:
        for d in p.get("tool_calls", []):
            c = calls.setdefault(d["index"], {"id": None, "name": "", "arguments": ""})
            c["id"] = d.get("id") or c["id"]
            c["name"] += d["function"].get("name") or ""
            c["arguments"] += d["function"].get("arguments") or ""
    return content, [calls[i] for i in sorted(calls)], reason


def test_auto_answers_whole_and_streamed(tokenizer, model) -> None:
    text = 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls, reason = _output(tokenizer, model).whole(text, "stop")
    assert content == "Sure." and reason == "tool_calls"
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert calls[0]["id"].startswith("chatcmpl-tool-") and calls[0]["type"] == "function"
    content, streamed, reason = _streamed(_output(tokenizer, model), text, "stop")
    assert content == "Sure." and reason == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == [
        ("get_weather", {"city": "Paris"})
    ]
    plain = _output(tokenizer, model).whole("It is sunny.", "stop")
    assert plain == ("It is sunny.", [], "stop")
    assert _streamed(_output(tokenizer, model), "It is sunny.", "length") == (
        "It is sunny.", [], "length"
    )


def test_required_and_named_answers(tokenizer, model) -> None:
    text = (
        '[{"name":"get_weather","parameters":{"city":"Oslo"}},'
        '{"name":"get_time","parameters":{}}]'
    )
    for reader in (
        lambda o: o.whole(text, "stop"),
        lambda o: _streamed(o, text, "stop"),
    ):
        content, calls, reason = reader(_output(tokenizer, model, tool_choice="required"))
        assert content is None and reason == "tool_calls" and len(calls) == 2
    named = {"type": "function", "function": {"name": "get_weather"}}
    args = '{"city":"Oslo"}'
    content, calls, reason = _output(tokenizer, model, tool_choice=named).whole(args, "stop")
    assert content is None and reason == "stop"  # OpenAI: a named function stops
    assert calls[0]["function"] == {"name": "get_weather", "arguments": args}
    content, calls, reason = _streamed(_output(tokenizer, model, tool_choice=named), args, "stop")
    assert content is None and reason == "stop" and len(calls) == 1
    assert calls[0]["name"] == "get_weather" and calls[0]["arguments"] == args


def test_response_shapes_carry_tool_calls() -> None:
    builder = ResponseBuilder("chatcmpl-1", MODEL, chat=True)
    call = {"id": "x", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    body = builder.full(None, "tool_calls", Usage(3, 4), tool_calls=[call])
    assert body["choices"][0]["message"] == {"role": "assistant", "content": None,
                                             "tool_calls": [call]}  # fmt: skip
    chunk = json.loads(builder.chunk(None, tool_calls=[{"index": 0, **call}])[6:])
    assert chunk["choices"][0]["delta"] == {"tool_calls": [{"index": 0, **call}]}
