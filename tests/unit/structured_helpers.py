"""Shared builders of the structured-output tests: one grammar backend per engine for the
whole session (building one reads the 49152-token vocabulary, ~0.3-1 s)."""

from __future__ import annotations

import functools
from typing import Any

from serving.structured.backend import GrammarBackend
from serving.structured.registry import GrammarEngine, make_grammar_backend

ENGINES: tuple[GrammarEngine, ...] = ("xgrammar", "llguidance")


@functools.cache
def backend_for(engine: GrammarEngine, tokenizer: Any) -> GrammarBackend:
    return make_grammar_backend(
        tokenizer, engine=engine, stop_token_ids=[tokenizer.eos_token_id], max_threads=1
    )
