"""OpenAI `response_format` / vLLM `structured_outputs` → `StructuredSpec`, and the 400s."""

from __future__ import annotations

import pytest

from serving.structured.request import (
    InvalidStructuredOutput,
    spec_from_request,
    spec_from_response_format,
    spec_from_structured_outputs,
)
from serving.structured.spec import StructuredKind, StructuredSpec

PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def test_response_format_kinds() -> None:
    assert spec_from_response_format({"type": "text"}) is None
    assert spec_from_response_format({"type": "json_object"}) == StructuredSpec.json_object()
    spec = spec_from_response_format(
        {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}
    )
    assert spec is not None and spec.kind is StructuredKind.JSON_SCHEMA
    assert spec.schema() == PERSON


def test_structured_outputs_kinds() -> None:
    assert spec_from_structured_outputs({"json": PERSON}) == StructuredSpec.json_schema(PERSON)
    # vLLM also takes the schema as a JSON string
    assert spec_from_structured_outputs({"json": '{"type": "object"}'}) == (
        StructuredSpec.json_schema({"type": "object"})
    )
    assert spec_from_structured_outputs({"regex": "[0-9]{3}"}) == StructuredSpec.regex("[0-9]{3}")
    assert spec_from_structured_outputs({"choice": ["a", "b"]}) == StructuredSpec.choice(("a", "b"))
    assert spec_from_structured_outputs({"grammar": 'root ::= "x"'}).kind is StructuredKind.GRAMMAR
    assert spec_from_structured_outputs({"json_object": True}) == StructuredSpec.json_object()
    assert spec_from_structured_outputs({"json_object": False}) is None
    assert spec_from_structured_outputs({}) is None


def test_same_schema_any_whitespace_is_one_cache_key() -> None:
    a = spec_from_structured_outputs({"json": '{"type":  "object",\n "required": []}'})
    b = spec_from_structured_outputs({"json": {"type": "object", "required": []}})
    assert a == b and hash(a) == hash(b)


def test_unconstrained_request() -> None:
    assert spec_from_request(None, None) is None
    assert spec_from_request({"type": "text"}, None) is None


@pytest.mark.parametrize(
    ("response_format", "structured_outputs", "message"),
    [
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "objekt"}}},
         None, "not a valid JSON schema"),
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"minLength": -1}}},
         None, "not a valid JSON schema"),
        ({"type": "json_schema", "json_schema": {"name": "p"}}, None, "schema is required"),
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": [1]}}, None,
         "must be a JSON object"),
        ({"type": "yaml"}, None, "must be one of"),
        (None, {"json": "{not json"}, "not JSON"),
        (None, {"regex": "(abc"}, "not a valid regular expression"),
        (None, {"regex": ""}, "non-empty string"),
        (None, {"choice": []}, "non-empty list"),
        (None, {"choice": ["a", 1]}, "non-empty list"),
        (None, {"grammar": "  "}, "non-empty string"),
        (None, {"regex": "a", "choice": ["a"]}, "takes one of"),
        (None, {"structural_tag": "{}"}, "not supported"),
        ({"type": "json_object"}, {"regex": "a"}, "not both"),
    ],
)
def test_invalid_requests_raise_value_error(response_format, structured_outputs, message) -> None:
    with pytest.raises(ValueError, match=message) as info:
        spec_from_request(response_format, structured_outputs)
    assert isinstance(info.value, InvalidStructuredOutput)
    assert info.value.http_status == 400
