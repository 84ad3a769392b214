"""Seeded JSON schemas, each with one instance it accepts, for tests and benchmarks.

Shapes follow what JSON-producing apps send under OpenAI's strict mode: nested objects
with `additionalProperties: false`, arrays with item bounds, enums, bounded integers and
numbers, strings with length bounds or a pattern, nullable fields. Properties are listed in
the order the instance uses, since both engines emit properties in declared order.
Not on the serving path.
"""

from __future__ import annotations

import random
from typing import Any

_NAMES = (
    "id", "name", "title", "count", "price", "tags", "owner", "status", "items", "score",
    "city", "kind", "notes", "level", "email", "active", "rating", "code", "parts", "meta",
)
# (pattern, an instance): patterns both engines support (no lookaround, no backrefs)
_PATTERNS = (
    (r"^[a-z]{3}-[0-9]{2}$", "abc-12"),
    (r"^[A-Z][a-z]{1,8}$", "Paris"),
    (r"^\d{4}-\d{2}-\d{2}$", "2026-12-05"),
    (r"^(red|green|blue)$", "green"),
    (r"^[a-f0-9]{8}$", "deadbeef"),
)
_WORDS = ("alpha", "beta", "gamma", "delta", "omega")

Schema = dict[str, Any]


def _leaf(rng: random.Random) -> tuple[Schema, Any]:
    kind = rng.choice(("string", "pattern", "integer", "number", "boolean", "enum", "nullable"))
    if kind == "string":
        lo = rng.randint(1, 3)
        return {"type": "string", "minLength": lo, "maxLength": lo + rng.randint(2, 8)}, "x" * lo
    if kind == "pattern":
        pattern, example = rng.choice(_PATTERNS)
        return {"type": "string", "pattern": pattern}, example
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(1, 1000)}, lo
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": 100}, round(rng.uniform(0, 100), 2)
    if kind == "boolean":
        return {"type": "boolean"}, rng.random() < 0.5
    if kind == "enum":
        options = rng.sample(_WORDS, k=rng.randint(2, 4))
        return {"type": "string", "enum": options}, options[-1]
    return {"type": ["string", "null"], "maxLength": 6}, None


def _array(rng: random.Random, depth: int) -> tuple[Schema, Any]:
    items, example = _object(rng, depth + 1) if depth < 2 and rng.random() < 0.4 else _leaf(rng)
    lo = rng.randint(0, 2)
    schema = {"type": "array", "items": items, "minItems": lo, "maxItems": lo + rng.randint(1, 3)}
    return schema, [example] * max(lo, 1)


def _object(rng: random.Random, depth: int) -> tuple[Schema, dict[str, Any]]:
    names = rng.sample(_NAMES, k=rng.randint(2, 5))
    properties: dict[str, Schema] = {}
    example: dict[str, Any] = {}
    for name in names:
        r = rng.random()
        if depth < 2 and r < 0.25:
            properties[name], example[name] = _object(rng, depth + 1)
        elif depth < 3 and r < 0.45:
            properties[name], example[name] = _array(rng, depth)
        else:
            properties[name], example[name] = _leaf(rng)
    required = [n for n in names if rng.random() < 0.7] or names[:1]
    schema = {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }
    return schema, example


def make_schema(seed: int) -> tuple[Schema, dict[str, Any]]:
    """A nested object schema and an instance of it, both determined by `seed`."""
    return _object(random.Random(seed), depth=0)


def make_schemas(num_schemas: int, seed: int = 0) -> list[tuple[Schema, dict[str, Any]]]:
    return [make_schema(seed * 100_003 + i) for i in range(num_schemas)]
