"""Whatever a sampler picks among the allowed tokens ends as valid output: seeded random
walks over ≥20 generated schemas (both engines), json_object, a regex and a choice."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
from structured_helpers import ENGINES, backend_for

from serving.structured.cache import GrammarCache
from serving.structured.sample_schemas import make_schemas
from serving.structured.spec import StructuredSpec
from serving.structured.walk import closing_token_ids, random_walk

NUM_SCHEMAS = 24
NUM_WALKS = 2  # seeds per schema


def _walk_texts(tokenizer, engine: str, spec: StructuredSpec, num_walks: int) -> list[str]:
    backend = backend_for(engine, tokenizer)
    cache = GrammarCache(backend)
    preferred = closing_token_ids(tokenizer, [tokenizer.eos_token_id])
    texts = []
    for seed in range(num_walks):
        result = random_walk(cache.new_matcher(spec), backend.vocab_size,
                             random.Random(seed), preferred)
        assert result.terminated, f"seed {seed}: no stop token within the step budget"
        texts.append(tokenizer.decode(result.token_ids))
    return texts


@pytest.mark.parametrize("engine", ENGINES)
def test_random_walks_over_generated_schemas_validate(tokenizer, engine: str) -> None:
    for i, (schema, _) in enumerate(make_schemas(NUM_SCHEMAS, seed=1)):
        for text in _walk_texts(tokenizer, engine, StructuredSpec.json_schema(schema), NUM_WALKS):
            try:
                jsonschema.validate(json.loads(text), schema)
            except (ValueError, jsonschema.ValidationError) as e:
                raise AssertionError(f"schema {i}: {text!r} -> {e}") from e


@pytest.mark.parametrize("engine", ENGINES)
def test_valid_documents_are_accepted_token_by_token(tokenizer, engine: str) -> None:
    backend = backend_for(engine, tokenizer)
    for schema, instance in make_schemas(NUM_SCHEMAS, seed=2):
        matcher = backend.new_matcher(backend.compile(StructuredSpec.json_schema(schema)))
        ids = tokenizer.encode(json.dumps(instance), add_special_tokens=False)
        assert matcher.validate_tokens(ids + [tokenizer.eos_token_id]) == len(ids) + 1


@pytest.mark.parametrize("engine", ENGINES)
def test_json_object_gives_an_object(tokenizer, engine: str) -> None:
    for text in _walk_texts(tokenizer, engine, StructuredSpec.json_object(), 4):
        assert isinstance(json.loads(text), dict), text


@pytest.mark.parametrize("engine", ENGINES)
def test_regex_holds(tokenizer, engine: str) -> None:
    pattern = r"[A-Z][a-z]{2,6}-[0-9]{2,3}(\.[a-z]+)?"
    for text in _walk_texts(tokenizer, engine, StructuredSpec.regex(pattern), 6):
        assert re.fullmatch(pattern, text), text


@pytest.mark.parametrize("engine", ENGINES)
def test_choice_holds(tokenizer, engine: str) -> None:
    options = ("yes", "no", 'say "maybe"', "yes please")  # quotes and a shared prefix
    texts = _walk_texts(tokenizer, engine, StructuredSpec.choice(options), 12)
    assert set(texts) <= set(options), texts
    assert len(set(texts)) > 1
