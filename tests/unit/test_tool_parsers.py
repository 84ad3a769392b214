"""Tool-call parsers (`serving/api/tool_parsers`): whole answers and streams cut at every
possible place give the same calls and the same text around them."""

from __future__ import annotations

import json

import pytest

from serving.api.tool_parsers import (
    ContentDelta,
    ToolCallDelta,
    get_tool_parser,
)

WEATHER = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
TIME = {"name": "get_time", "arguments": {"zone": "CET"}}


def hermes(call: dict) -> str:
    return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"


def stream(parser_name: str, text: str, cut: int) -> tuple[str, list[dict]]:
    """Feed `text` in pieces of `cut` characters; (content, calls) as a client sees them."""
    parser = get_tool_parser(parser_name)
    deltas = []
    for i in range(0, len(text), cut):
        deltas += parser.feed(text[i : i + cut])
    deltas += parser.finish()
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    calls = [d.to_openai() for d in deltas if isinstance(d, ToolCallDelta)]
    assert [c["index"] for c in calls] == list(range(len(calls)))
    assert parser.num_calls == len(calls)
    return content, calls


def as_plain(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize(
    "text, content, calls",
    [
        (hermes(WEATHER), None, [WEATHER]),
        ("Let me check. " + hermes(WEATHER) + hermes(TIME), "Let me check.", [WEATHER, TIME]),
        ("No tools needed: 2 < 3 and <b>bold</b>.", "No tools needed: 2 < 3 and <b>bold</b>.", []),
        # cut by max_tokens after a complete object: still a call
        ('<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}', None, [TIME]),
        # not JSON inside the tags: the text as written, no call
        ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
        # "parameters" (Llama style) and arguments sent as a string
        (hermes({"name": "get_time", "parameters": {"zone": "CET"}}), None, [TIME]),
        (hermes({"name": "get_time", "arguments": '{"zone": "CET"}'}), None, [TIME]),
    ],
)
def test_hermes_whole_and_streamed_agree(text: str, content: str | None, calls: list[dict]):
    parsed = get_tool_parser("hermes").parse(text)
    assert parsed.content == content
    expected = [(c["name"], c.get("arguments", c.get("parameters"))) for c in calls]
    assert as_plain([c.to_openai() for c in parsed.tool_calls]) == expected
    assert parsed.finish_reason == ("tool_calls" if calls else None)
    for cut in (1, 2, 3, 5, 7, 11, len(text)):
        streamed_content, streamed_calls = stream("hermes", text, cut)
        assert as_plain(streamed_calls) == expected, cut
        if calls:  # text before the first call streams; whitespace around calls may differ
            assert streamed_content.strip() == (content or ""), cut
        else:
            assert streamed_content == text, cut


def test_hermes_streams_text_at_once_and_holds_only_a_possible_tag():
    parser = get_tool_parser("hermes")
    assert parser.feed("Hello wor") == [ContentDelta("Hello wor")]
    assert parser.feed("ld <tool") == [ContentDelta("ld ")]  # "<tool" may open a call
    assert parser.feed("s are great") == [ContentDelta("<tools are great")]


def test_openai_shape_and_unique_ids():
    calls = get_tool_parser("hermes").parse(hermes(WEATHER) + hermes(WEATHER)).tool_calls
    shaped = [c.to_openai() for c in calls]
    assert shaped[0]["type"] == "function"
    assert shaped[0]["id"].startswith("chatcmpl-tool-") and shaped[0]["id"] != shaped[1]["id"]
    assert json.loads(shaped[0]["function"]["arguments"]) == WEATHER["arguments"]


@pytest.mark.parametrize(
    "text, is_call",
    [
        (json.dumps(WEATHER), True),
        (json.dumps([WEATHER, TIME]), True),
        ('  {"name": "get_time", "parameters": {"zone": "CET"}}', True),
        ('{"city": "Paris"}', False),  # JSON, but not a call
        ("The weather is fine.", False),
        ('{"name": "get_time", "arguments": {"zone": ', False),  # cut: not a call
    ],
)
def test_json_parser(text: str, is_call: bool):
    parsed = get_tool_parser("json").parse(text)
    assert bool(parsed.tool_calls) is is_call
    assert parsed.content == (None if is_call else text)
    for cut in (1, 4, len(text)):
        content, calls = stream("json", text, cut)
        assert bool(calls) is is_call
        assert content == ("" if is_call else text)


def test_json_parser_streams_plain_text_without_holding_it():
    parser = get_tool_parser("json")
    assert parser.feed("  ") == []
    assert parser.feed("Sure") == [ContentDelta("  Sure")]


def test_unknown_parser_names_the_known_ones():
    with pytest.raises(ValueError, match="hermes, json"):
        get_tool_parser("mistral")
