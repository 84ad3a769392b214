"""`GrammarBackend` on xgrammar: grammars compiled ahead into per-state token-mask caches,
so filling a mask during decode is mostly copying precomputed bits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import xgrammar as xgr

from serving.structured.choice import choice_ebnf
from serving.structured.request import InvalidStructuredOutput
from serving.structured.spec import StructuredKind, StructuredSpec


class XGrammarMatcher:
    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        self._m = xgr.GrammarMatcher(compiled)

    def accept_token(self, token_id: int) -> bool:
        return self._m.accept_token(token_id)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > 0:
            self._m.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return self._m.is_terminated()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def validate_tokens(self, token_ids: Sequence[int]) -> int:
        # accept_token leaves the state unchanged on a refused token, so accept-then-undo
        num_ok = 0
        for t in token_ids:
            if self._m.is_terminated() or not self._m.accept_token(t):
                break
            num_ok += 1
        self.rollback(num_ok)
        return num_ok


class XGrammarBackend:
    name = "xgrammar"

    def __init__(
        self,
        tokenizer: Any,
        *,
        vocab_size: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        any_whitespace: bool = True,
        max_threads: int = 2,
    ) -> None:
        """`tokenizer`: a Hugging Face tokenizer; `vocab_size`: the model's logits width
        (defaults to the tokenizer's size); `any_whitespace`: as vLLM's default, JSON may
        carry whitespace between tokens (False: compact JSON only)."""
        self.vocab_size = vocab_size or len(tokenizer)
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer,
            vocab_size=self.vocab_size,
            stop_token_ids=list(stop_token_ids) if stop_token_ids else None,
        )
        # NOTE: xgrammar's own cache is off: GrammarCache bounds the count, and two caches
        # would hold every grammar twice.
        self._compiler = xgr.GrammarCompiler(info, max_threads=max_threads, cache_enabled=False)
        self._any_whitespace = any_whitespace

    def compile(self, spec: StructuredSpec) -> xgr.CompiledGrammar:
        try:
            return self._compile(spec)
        except (RuntimeError, ValueError) as e:  # xgrammar raises both for bad input
            raise InvalidStructuredOutput(f"{spec.kind.value}: {e}") from e

    def _compile(self, spec: StructuredSpec) -> xgr.CompiledGrammar:
        kind, payload = spec.kind, spec.payload
        if kind is StructuredKind.JSON_SCHEMA:
            assert isinstance(payload, str)
            return self._compiler.compile_json_schema(
                payload, any_whitespace=self._any_whitespace, strict_mode=True
            )
        if kind is StructuredKind.JSON_OBJECT:
            # strict_mode off: in strict mode an object schema without properties admits only {}
            return self._compiler.compile_json_schema(
                '{"type": "object"}', any_whitespace=self._any_whitespace, strict_mode=False
            )
        if kind is StructuredKind.REGEX:
            assert isinstance(payload, str)
            return self._compiler.compile_regex(payload)
        if kind is StructuredKind.CHOICE:
            assert isinstance(payload, tuple)
            return self._compiler.compile_grammar(choice_ebnf(payload))
        assert isinstance(payload, str)
        return self._compiler.compile_grammar(payload)

    def new_matcher(self, compiled: object) -> XGrammarMatcher:
        assert isinstance(compiled, xgr.CompiledGrammar)
        return XGrammarMatcher(compiled)

    def fill_bitmasks(
        self, matchers: Sequence[Any], rows: Sequence[int], bitmask: torch.Tensor
    ) -> None:
        # NOTE: one row at a time on purpose. xgrammar's BatchGrammarMatcher hands rows to
        # threads, and on our loaded 2-core machines that cost 119 us per step of 8 against
        # 12 us for this loop (a row is ~2 us; benchmarks/results/2026-12-05/grammar/).
        for m, row in zip(matchers, rows, strict=True):
            m.fill_bitmask(bitmask, row)
