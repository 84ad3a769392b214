"""Matcher state: rollback, termination, draft validation for speculation, the cache."""

from __future__ import annotations

import pytest
import torch
from structured_helpers import ENGINES, backend_for

from serving.structured.backend import allocate_bitmask
from serving.structured.cache import GrammarCache
from serving.structured.request import InvalidStructuredOutput
from serving.structured.spec import StructuredSpec
from serving.structured.speculation import fill_draft_bitmasks, validate_draft

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
DOC = '{"name": "Ada", "age": 36}'


def _mask(matcher, vocab_size: int) -> torch.Tensor:
    bitmask = allocate_bitmask(1, vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    return bitmask[0].clone()


def _setup(tokenizer, engine: str):
    backend = backend_for(engine, tokenizer)
    matcher = backend.new_matcher(backend.compile(StructuredSpec.json_schema(SCHEMA)))
    ids = tokenizer.encode(DOC, add_special_tokens=False)
    return backend, matcher, ids


@pytest.mark.parametrize("engine", ENGINES)
def test_rollback_restores_state(tokenizer, engine: str) -> None:
    backend, matcher, ids = _setup(tokenizer, engine)
    for t in ids[:3]:
        assert matcher.accept_token(t)
    before = _mask(matcher, backend.vocab_size)
    for t in ids[3:7]:
        assert matcher.accept_token(t)
    assert not torch.equal(_mask(matcher, backend.vocab_size), before)
    matcher.rollback(4)
    assert torch.equal(_mask(matcher, backend.vocab_size), before)
    # and the rest of the document is still accepted from there
    assert matcher.validate_tokens(ids[3:] + [tokenizer.eos_token_id]) == len(ids) - 2


@pytest.mark.parametrize("engine", ENGINES)
def test_refused_token_leaves_state_unchanged_and_stop_terminates(tokenizer, engine) -> None:
    backend, matcher, ids = _setup(tokenizer, engine)
    eos = tokenizer.eos_token_id
    assert not matcher.accept_token(tokenizer.encode("x", add_special_tokens=False)[0])
    assert not matcher.accept_token(eos)  # not before the object is complete
    for t in ids:
        assert matcher.accept_token(t)
    assert not matcher.is_terminated()
    assert matcher.accept_token(eos) and matcher.is_terminated()
    matcher.rollback(1)  # a rejected speculative stop
    assert not matcher.is_terminated()
    matcher.rollback(2)
    assert matcher.validate_tokens(ids[-2:] + [eos]) == 3


@pytest.mark.parametrize("engine", ENGINES)
def test_validate_draft_takes_the_longest_valid_prefix(tokenizer, engine: str) -> None:
    backend, matcher, ids = _setup(tokenizer, engine)
    bad = tokenizer.encode("]", add_special_tokens=False)[0]
    assert validate_draft(matcher, ids[:5]) == 5
    assert validate_draft(matcher, ids[:3] + [bad] + ids[3:5]) == 3
    assert validate_draft(matcher, [bad]) == 0
    assert validate_draft(matcher, ids + [tokenizer.eos_token_id, ids[0]]) == len(ids) + 1
    assert _mask(matcher, backend.vocab_size).equal(_mask(backend.new_matcher(
        backend.compile(StructuredSpec.json_schema(SCHEMA))), backend.vocab_size))


@pytest.mark.parametrize("engine", ENGINES)
def test_fill_draft_bitmasks_gives_each_positions_mask(tokenizer, engine: str) -> None:
    backend, matcher, ids = _setup(tokenizer, engine)
    bad = tokenizer.encode("]", add_special_tokens=False)[0]
    draft = ids[:3] + [bad, ids[3]]
    bitmask = allocate_bitmask(1 + len(draft), backend.vocab_size)
    assert fill_draft_bitmasks(matcher, draft, bitmask) == 3
    reference = backend.new_matcher(backend.compile(StructuredSpec.json_schema(SCHEMA)))
    for j in range(4):  # the masks before each of the 3 valid tokens and after the last
        assert torch.equal(bitmask[j], _mask(reference, backend.vocab_size)), j
        if j < 3:
            reference.accept_token(draft[j])
    assert torch.equal(bitmask[4], torch.full_like(bitmask[4], -1))  # never read: untouched
    assert validate_draft(matcher, ids) == len(ids)  # matcher left at the start


class _CountingBackend:
    """Wraps a backend to count compiles."""

    def __init__(self, inner) -> None:
        self.inner, self.num_compiles = inner, 0
        self.name, self.vocab_size = inner.name, inner.vocab_size

    def compile(self, spec):
        self.num_compiles += 1
        return self.inner.compile(spec)

    def new_matcher(self, compiled):
        return self.inner.new_matcher(compiled)

    def fill_bitmasks(self, matchers, rows, bitmask):
        self.inner.fill_bitmasks(matchers, rows, bitmask)


@pytest.mark.parametrize("engine", ENGINES)
def test_cache_hits_do_not_recompile_and_evict_least_recent(tokenizer, engine: str) -> None:
    backend = _CountingBackend(backend_for(engine, tokenizer))
    cache = GrammarCache(backend, max_entries=2)
    a, b, c = (StructuredSpec.regex(p) for p in ("a+", "b+", "c+"))
    first = cache.get(a)
    assert cache.get(a) is first and backend.num_compiles == 1 and cache.num_hits == 1
    # equal specs built separately share the entry
    cache.new_matcher(StructuredSpec.json_schema(SCHEMA))
    cache.new_matcher(StructuredSpec.json_schema(dict(SCHEMA)))
    assert backend.num_compiles == 2
    cache.get(a)  # a is now the most recent; b arrives and the schema goes
    cache.get(b)
    assert a in cache and b in cache and len(cache) == 2
    cache.get(c)
    assert a not in cache and backend.num_compiles == 4


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_refusals_are_value_errors(tokenizer, engine: str) -> None:
    cache = GrammarCache(backend_for(engine, tokenizer))
    for spec in (StructuredSpec.grammar("root ::= "), StructuredSpec.regex("(?<=a)b")):
        with pytest.raises(ValueError) as info:
            cache.get(spec)
        assert isinstance(info.value, InvalidStructuredOutput)
    assert len(cache) == 0
