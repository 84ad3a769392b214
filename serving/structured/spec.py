"""`StructuredSpec`: what one request asks its output to match, independent of any engine.

A spec is a small frozen value so it can key the compiled-grammar cache: two requests with
the same schema (whatever its key order or whitespace) map to the same spec and share one
compiled grammar.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Any


class StructuredKind(Enum):
    JSON_SCHEMA = "json_schema"  # payload: the schema as canonical JSON text
    JSON_OBJECT = "json_object"  # payload: "" (any JSON object)
    REGEX = "regex"  # payload: the regular expression
    CHOICE = "choice"  # payload: tuple of the allowed strings, in request order
    GRAMMAR = "grammar"  # payload: an EBNF (GBNF-style) grammar, as vLLM's xgrammar backend takes


@dataclass(frozen=True, slots=True)
class StructuredSpec:
    kind: StructuredKind
    payload: str | tuple[str, ...]

    @classmethod
    def json_schema(cls, schema: dict[str, Any]) -> StructuredSpec:
        # NOTE: sort_keys only for the cache key's sake would reorder "properties", and the
        # engines emit properties in their declared order; so keep order, drop whitespace.
        return cls(StructuredKind.JSON_SCHEMA, json.dumps(schema, separators=(",", ":")))

    @classmethod
    def json_object(cls) -> StructuredSpec:
        return cls(StructuredKind.JSON_OBJECT, "")

    @classmethod
    def regex(cls, pattern: str) -> StructuredSpec:
        return cls(StructuredKind.REGEX, pattern)

    @classmethod
    def choice(cls, options: list[str] | tuple[str, ...]) -> StructuredSpec:
        return cls(StructuredKind.CHOICE, tuple(options))

    @classmethod
    def grammar(cls, text: str) -> StructuredSpec:
        return cls(StructuredKind.GRAMMAR, text)

    def schema(self) -> dict[str, Any]:
        assert self.kind is StructuredKind.JSON_SCHEMA
        assert isinstance(self.payload, str)
        return json.loads(self.payload)
