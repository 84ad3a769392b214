"""Structured output and tool calling on the real app (real Ray, SmolLM2-135M in fp32),
with the official `openai` client.

The shared test app first (disaggregated: the prefill replica samples the first token
under the grammar, the decode replica replays it into its own matcher; speculation off),
then the product defaults (one engine, n-gram speculation on): over 20 generated JSON
schemas every answer parses and validates with `jsonschema` unless `finish_reason` is
`length`, streaming and not, and greedy answers are the same with speculation as without.
Then regex and choice, json_object, the 400s, and tool calls for named, required and auto
choices, streaming and not.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

from serving.structured.sample_schemas import make_schemas
from tests.integration.conftest import MODEL

pytestmark = pytest.mark.integration

NUM_SCHEMAS = 20
NUM_COMPARED = 8  # greedy answers compared with and without speculation
MAX_TOKENS = 96


def _smallest_schemas(num: int) -> list[dict]:
    """`num` of twice as many generated schemas, those with the shortest example instance
    (nested objects, arrays, enums and numbers still; the answers stay short enough for
    CI's time budget)."""
    generated = make_schemas(2 * num, seed=3)
    generated.sort(key=lambda pair: len(json.dumps(pair[1], separators=(",", ":"))))
    return [schema for schema, _ in generated[:num]]


SCHEMAS = _smallest_schemas(NUM_SCHEMAS)
SPEC_ON = {"scheduling": {"pd_mode": "auto"}, "speculation": {"enabled": True}}
# greedy answers of the speculation-off app, per schema, for the speculation-on app
_GREEDY: dict[int, str] = {}


def _json_request(i: int, schema: dict) -> dict:
    return dict(
        model=MODEL,
        messages=[
            {"role": "user", "content": f"Give an example JSON object for: {json.dumps(schema)}"}
        ],
        max_tokens=MAX_TOKENS,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": f"schema_{i}", "schema": schema, "strict": True},
        },
    )


def _check(text: str, reason: str, schema: dict) -> bool:
    """True when the answer is complete and valid; a `length` cut is allowed."""
    if reason == "length":
        return False
    assert reason == "stop", reason
    jsonschema.validate(json.loads(text), schema)
    return True


def _streamed(client, **kw) -> tuple[str, str]:
    text, reason = [], None
    for chunk in client.chat.completions.create(**kw, stream=True):
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            reason = chunk.choices[0].finish_reason or reason
    return "".join(text), reason


def _whole(client, **kw) -> tuple[str, str]:
    choice = client.chat.completions.create(**kw).choices[0]
    return choice.message.content, choice.finish_reason


def _run_schemas(app) -> dict[int, str]:
    """The first NUM_COMPARED schemas' greedy answers one at a time (so batches are alike
    on the two apps), then the others' whole answers and all 20 streamed, 8 at a time;
    every answer checked."""
    client = app.client()
    answers = {}
    results = []
    for i in range(NUM_COMPARED):
        answers[i], reason = _whole(client, **_json_request(i, SCHEMAS[i]))
        results.append((answers[i], reason, SCHEMAS[i]))
    jobs = [(_whole, i) for i in range(NUM_COMPARED, NUM_SCHEMAS)]
    jobs += [(_streamed, i) for i in range(NUM_SCHEMAS)]

    def run(job) -> tuple[str, str, dict]:
        fn, i = job
        return (*fn(client, **_json_request(i, SCHEMAS[i])), SCHEMAS[i])

    with ThreadPoolExecutor(8) as pool:
        results += list(pool.map(run, jobs))
    num_valid = sum(_check(text, reason, schema) for text, reason, schema in results)
    assert num_valid >= NUM_SCHEMAS  # most answers complete well within MAX_TOKENS
    return answers


def test_json_schemas_validate_without_speculation(app) -> None:
    _GREEDY.update(_run_schemas(app))


def test_regex_choice_and_json_object(app) -> None:
    client = app.client()
    pattern = r"\(\d{3}\) \d{3}-\d{4}"
    kw = dict(model=MODEL, prompt="My phone number is", max_tokens=30, temperature=0)
    resp = client.completions.create(**kw, extra_body={"structured_outputs": {"regex": pattern}})
    assert re.fullmatch(pattern, resp.choices[0].text) and resp.choices[0].finish_reason == "stop"
    guided = {"guided_regex": pattern}
    chunks = list(client.completions.create(**kw, stream=True, extra_body=guided))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == resp.choices[0].text
    question = [{"role": "user", "content": "Is the sky blue?"}]
    chat = dict(model=MODEL, messages=question, max_tokens=10, temperature=0)
    for extra in ({"structured_outputs": {"choice": ["yes", "no"]}}, {"guided_choice": ["no"]}):
        resp = client.chat.completions.create(**chat, extra_body=extra)
        assert resp.choices[0].message.content in ("yes", "no") and len(resp.choices) == 1
        text, reason = _streamed(client, **chat, extra_body=extra)
        assert text == resp.choices[0].message.content and reason == "stop"
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a cat as JSON."}],
        max_tokens=100,
        temperature=0,
        response_format={"type": "json_object"},
    )
    if resp.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(resp.choices[0].message.content), dict)


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format"),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
         "response_format"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "start: @@@"}}, "structured_outputs"),  # engine's
        ({"structured_outputs": {"choice": []}}, "structured_outputs"),
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ],
)  # fmt: skip
def test_bad_specs_are_400s_naming_the_field(app, extra: dict, param: str) -> None:
    client = app.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            extra_body=extra,
        )
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
    # nothing reached an engine: the next request is served as usual
    ok = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert ok.choices[0].message.content


# --- tool calls ------------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Get the local time in a time zone",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "enum": ["CET", "UTC", "EST"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def _call(call_id: str, city: str) -> dict:
    function = {"name": "get_weather", "arguments": json.dumps({"city": city})}
    return {"id": call_id, "type": "function", "function": function}


# Two earlier turns in which the assistant called the tool: the history's tool calls
# render through the template, and the small model follows them with a call of its own.
TWO_SHOT = [
    {"role": "user", "content": "What is the weather in Berlin?"},
    {"role": "assistant", "content": None, "tool_calls": [_call("call_1", "Berlin")]},
    {"role": "user", "content": "What is the weather in Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [_call("call_2", "Rome")]},
    {"role": "user", "content": "What is the weather in Paris?"},
]


def _tool_answer(client, stream: bool, **kw) -> tuple[str | None, list[dict], str]:
    """(content, calls as plain dicts, finish_reason), streamed deltas accumulated by index
    as OpenAI's clients do."""
    kw = dict(model=MODEL, max_tokens=80, temperature=0, tools=TOOLS) | kw
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        calls = [c.model_dump() for c in choice.message.tool_calls or []]
        return choice.message.content, calls, choice.finish_reason
    content, calls, reason = "", {}, None
    for chunk in client.chat.completions.create(**kw, stream=True):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "type": "function",
                                              "function": {"name": "", "arguments": ""}})
            call["id"] = d.id or call["id"]
            if d.function is not None:
                call["function"]["name"] += d.function.name or ""
                call["function"]["arguments"] += d.function.arguments or ""
        reason = chunk.choices[0].finish_reason or reason
    return content or None, [calls[i] for i in sorted(calls)], reason


def _valid_call(call: dict, name: str | None = None) -> dict:
    assert call["id"].startswith("chatcmpl-tool-") and call["type"] == "function"
    tool = next(t for t in TOOLS if t["function"]["name"] == call["function"]["name"])
    assert name is None or call["function"]["name"] == name
    args = json.loads(call["function"]["arguments"])
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


@pytest.mark.parametrize("stream", [False, True])
def test_named_and_required_tool_calls(app, stream: bool) -> None:
    client = app.client()
    named = {"type": "function", "function": {"name": "get_weather"}}
    content, calls, reason = _tool_answer(client, stream, messages=ASK, tool_choice=named)
    assert len(calls) == 1 and reason == "stop" and not content  # OpenAI: named → stop
    assert _valid_call(calls[0], "get_weather")["city"]
    content, calls, reason = _tool_answer(client, stream, messages=ASK, tool_choice="required")
    assert calls and reason == "tool_calls" and not content
    for call in calls:
        _valid_call(call)
    _, calls, _ = _tool_answer(
        client, stream, messages=ASK, tool_choice="required", parallel_tool_calls=False
    )
    assert len(calls) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_auto_tool_calls_parse_and_plain_answers_stay_text(app, stream: bool) -> None:
    client = app.client()
    content, calls, reason = _tool_answer(client, stream, messages=TWO_SHOT)
    assert reason == "tool_calls" and not content
    assert [_valid_call(c, "get_weather") for c in calls] == [{"city": "Paris"}]
    content, calls, reason = _tool_answer(client, stream, messages=ASK, tool_choice="auto")
    assert not calls and content and reason in ("stop", "length")
    # a tool's result in the history keeps its fields through the template
    history = [*TWO_SHOT, {"role": "assistant", "content": None, "tool_calls": [calls_paris()]},
               {"role": "tool", "tool_call_id": "call_3", "content": '{"temperature": 18}'}]
    content, calls, reason = _tool_answer(client, stream, messages=history, tool_choice="none")
    assert content and not calls and reason in ("stop", "length")


def calls_paris() -> dict:
    return _call("call_3", "Paris")


def test_tool_history_renders_with_its_fields(app) -> None:
    history = [*TWO_SHOT, {"role": "assistant", "content": None, "tool_calls": [calls_paris()]},
               {"role": "tool", "tool_call_id": "call_3", "content": '{"temperature": 18}'}]
    with app.http() as h:
        ids = h.post("/tokenize", json={"messages": history, "tools": TOOLS}).json()["tokens"]
        text = h.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert '"name": "get_weather"' in text and '{"city": "Paris"}' in text  # calls
    assert '{"temperature": 18}' in text and "<tools>" in text  # the result, the tools


# last: the app with speculation (the tests above share the default test app)
def test_json_schemas_validate_and_match_with_speculation(apps) -> None:
    if len(_GREEDY) != NUM_COMPARED:
        pytest.skip("needs the speculation-off answers of the test before")
    app = apps.get(SPEC_ON)
    decode = app.deployment("decode")
    before = decode.stats.remote().result()["spec_decode"]
    answers = _run_schemas(app)
    after = decode.stats.remote().result()["spec_decode"]
    assert after["num_spec_steps"] > before["num_spec_steps"]  # it did speculate
    for i in range(NUM_COMPARED):
        assert answers[i] == _GREEDY[i], i
