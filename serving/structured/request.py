"""OpenAI `response_format` and vLLM `structured_outputs` request fields → `StructuredSpec`.

Pure and engine-free, so the API's `prepare` step can reject a bad request with a 400
before anything reaches an engine. What is checked here is what can be checked without a
tokenizer (schema well-formed, regex parses, choices non-empty); what only the grammar
engine can tell (an unsupported schema keyword, engine-specific regex syntax) surfaces as
the same `InvalidStructuredOutput` from `GrammarCache.get` at admission.

    response_format = {"type": "json_schema",
                       "json_schema": {"name": "person", "schema": {...}, "strict": True}}
    structured_outputs = {"regex": "[0-9]{3}"}      # or json / choice / grammar / json_object
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import jsonschema

from serving.structured.spec import StructuredSpec

# vLLM's StructuredOutputsParams: exactly one of these carries the constraint.
STRUCTURED_OUTPUT_KINDS = ("json", "regex", "choice", "grammar", "json_object")
# vLLM fields we read or that only tune the constraint; anything else defined by vLLM for
# structured outputs and unsupported here is refused rather than silently dropped.
_UNSUPPORTED_STRUCTURED_FIELDS = ("structural_tag", "whitespace_pattern")
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


class InvalidStructuredOutput(ValueError):
    """A structured-output request the API answers with 400; the message names the field."""

    http_status = 400


def spec_from_request(
    response_format: Mapping[str, Any] | None,
    structured_outputs: Mapping[str, Any] | None,
) -> StructuredSpec | None:
    """The spec of a chat/completions request, or None when its output is unconstrained."""
    if response_format is not None and structured_outputs is not None:
        rf = spec_from_response_format(response_format)
        so = spec_from_structured_outputs(structured_outputs)
        if rf is not None and so is not None:
            raise InvalidStructuredOutput(
                "set either 'response_format' or 'structured_outputs', not both"
            )
        return rf or so
    if response_format is not None:
        return spec_from_response_format(response_format)
    if structured_outputs is not None:
        return spec_from_structured_outputs(structured_outputs)
    return None


def spec_from_response_format(rf: Mapping[str, Any]) -> StructuredSpec | None:
    """OpenAI's `response_format`: text (None), json_object, or json_schema."""
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredSpec.json_object()
    if kind == "json_schema":
        body = rf.get("json_schema")
        if not isinstance(body, Mapping):
            raise InvalidStructuredOutput(
                "response_format.json_schema must be an object with 'name' and 'schema'"
            )
        schema = body.get("schema")
        if schema is None:
            raise InvalidStructuredOutput("response_format.json_schema.schema is required")
        # NOTE: strict true/false both get the schema enforced by the grammar: a
        # non-strict request only loses OpenAI's refusal to accept some schemas.
        checked = check_schema(schema, "response_format.json_schema.schema")
        return StructuredSpec.json_schema(checked)
    raise InvalidStructuredOutput(
        f"response_format.type must be one of {list(RESPONSE_FORMAT_TYPES)}, got {kind!r}"
    )


def spec_from_structured_outputs(so: Mapping[str, Any]) -> StructuredSpec | None:
    """vLLM's `structured_outputs` (json | regex | choice | grammar | json_object)."""
    for name in _UNSUPPORTED_STRUCTURED_FIELDS:
        if so.get(name) is not None:
            raise InvalidStructuredOutput(f"structured_outputs.{name} is not supported")
    present = [k for k in STRUCTURED_OUTPUT_KINDS if so.get(k) not in (None, False)]
    if not present:
        return None
    if len(present) > 1:
        raise InvalidStructuredOutput(
            f"structured_outputs takes one of {list(STRUCTURED_OUTPUT_KINDS)}, got {present}"
        )
    kind = present[0]
    value = so[kind]
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise InvalidStructuredOutput(f"structured_outputs.json is not JSON: {e}") from e
        return StructuredSpec.json_schema(check_schema(value, "structured_outputs.json"))
    if kind == "json_object":
        return StructuredSpec.json_object()
    if kind == "regex":
        return StructuredSpec.regex(check_regex(value, "structured_outputs.regex"))
    if kind == "choice":
        return StructuredSpec.choice(check_choices(value, "structured_outputs.choice"))
    if not isinstance(value, str) or not value.strip():
        raise InvalidStructuredOutput("structured_outputs.grammar must be a non-empty string")
    return StructuredSpec.grammar(value)


def check_schema(schema: Any, field: str) -> dict[str, Any]:
    if not isinstance(schema, Mapping):
        raise InvalidStructuredOutput(f"{field} must be a JSON object, got {type(schema).__name__}")
    schema = dict(schema)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise InvalidStructuredOutput(f"{field} is not a valid JSON schema at {where}: "
                                      f"{e.message}") from e
    return schema


def check_regex(pattern: Any, field: str) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise InvalidStructuredOutput(f"{field} must be a non-empty string")
    # Python's parser is a first pass: it catches unbalanced groups, bad repeats and the
    # like; syntax only Python accepts fails later in the engine with the same error type.
    try:
        re.compile(pattern)
    except re.error as e:
        raise InvalidStructuredOutput(f"{field} is not a valid regular expression: {e}") from e
    return pattern


def check_choices(choices: Any, field: str) -> tuple[str, ...]:
    if (not isinstance(choices, list | tuple) or not choices
            or not all(isinstance(c, str) and c for c in choices)):
        raise InvalidStructuredOutput(f"{field} must be a non-empty list of non-empty strings")
    return tuple(choices)
