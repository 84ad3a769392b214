"""`GrammarBackend` on llguidance: grammars are parsed, not precompiled; the lexer's states
and each mask are computed lazily while decoding, so compiling is cheap and the first
masks of a new grammar cost more."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import llguidance as llg
import llguidance.hf
import llguidance.torch
import torch

from serving.structured.choice import choice_lark
from serving.structured.request import InvalidStructuredOutput
from serving.structured.spec import StructuredKind, StructuredSpec


class LLGuidanceMatcher:
    """llguidance stops by itself once only a stop token can follow (xgrammar waits for the
    stop token). To give both the same contract (terminated once a stop token is accepted),
    a stop token accepted after such a self-stop is counted here, outside llguidance's
    history, and `rollback` undoes those first."""

    def __init__(self, tokenizer: llg.LLTokenizer, grammar: str, stop_ids: frozenset[int]):
        self._m = llg.LLMatcher(tokenizer, grammar, log_level=0)
        self._stop_ids = stop_ids
        self._num_virtual_stops = 0  # stop tokens accepted after llguidance had stopped
        self._stop_consumed = False  # llguidance itself consumed a stop token (the last one)

    def accept_token(self, token_id: int) -> bool:
        if token_id in self._stop_ids and self._m.is_stopped():
            self._num_virtual_stops += 1
            return True
        # NOTE: consume_token on a refused token puts the matcher into a permanent error
        # state; check first so a refusal leaves it usable, as xgrammar's does.
        if self._m.validate_tokens([token_id]) != 1 or not self._m.consume_token(token_id):
            return False
        self._stop_consumed = token_id in self._stop_ids
        return True

    def rollback(self, num_tokens: int) -> None:
        num_virtual = min(num_tokens, self._num_virtual_stops)
        self._num_virtual_stops -= num_virtual
        if num_tokens > num_virtual:
            self._m.rollback(num_tokens - num_virtual)
            self._stop_consumed = False  # a stop token is always the last one accepted

    def is_terminated(self) -> bool:
        return self._num_virtual_stops > 0 or self._stop_consumed

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        llguidance.torch.fill_next_token_bitmask(self._m, bitmask, row)

    def validate_tokens(self, token_ids: Sequence[int]) -> int:
        if self.is_terminated():
            return 0
        if self._m.is_stopped():
            return 1 if token_ids and token_ids[0] in self._stop_ids else 0
        return self._m.validate_tokens(list(token_ids))


class LLGuidanceBackend:
    name = "llguidance"

    def __init__(
        self,
        tokenizer: Any,
        *,
        vocab_size: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        any_whitespace: bool = True,
        max_threads: int = 2,
    ) -> None:
        self.vocab_size = vocab_size or len(tokenizer)
        eos = list(stop_token_ids) if stop_token_ids else None
        self._tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=self.vocab_size, eos_token=eos
        )
        self._stop_ids = frozenset(eos or [tokenizer.eos_token_id])
        self._executor = llg.LLExecutor(num_threads=max_threads)
        self._json_options: dict[str, Any] = {"whitespace_flexible": any_whitespace}

    def compile(self, spec: StructuredSpec) -> str:
        try:
            grammar = self._grammar(spec)
        except ValueError as e:
            raise InvalidStructuredOutput(f"{spec.kind.value}: {e}") from e
        error = llg.LLMatcher.validate_grammar(grammar, self._tokenizer)
        if error and not error.startswith("WARNING"):
            raise InvalidStructuredOutput(f"{spec.kind.value}: {error}")
        return grammar

    def _grammar(self, spec: StructuredSpec) -> str:
        kind, payload = spec.kind, spec.payload
        if kind is StructuredKind.JSON_SCHEMA:
            assert isinstance(payload, str)
            return llg.LLMatcher.grammar_from_json_schema(payload, defaults=self._json_options)
        if kind is StructuredKind.JSON_OBJECT:
            return llg.LLMatcher.grammar_from_json_schema(
                {"type": "object"}, defaults=self._json_options
            )
        if kind is StructuredKind.REGEX:
            assert isinstance(payload, str)
            return llg.LLMatcher.grammar_from_regex(payload)
        if kind is StructuredKind.CHOICE:
            assert isinstance(payload, tuple)
            return llg.LLMatcher.grammar_from_lark(choice_lark(payload))
        assert isinstance(payload, str)
        return llg.LLMatcher.grammar_from_lark(payload)

    def new_matcher(self, compiled: object) -> LLGuidanceMatcher:
        assert isinstance(compiled, str)
        return LLGuidanceMatcher(self._tokenizer, compiled, self._stop_ids)

    def fill_bitmasks(
        self, matchers: Sequence[Any], rows: Sequence[int], bitmask: torch.Tensor
    ) -> None:
        if len(matchers) == 1:
            matchers[0].fill_bitmask(bitmask, rows[0])
            return
        llguidance.torch.fill_next_token_bitmask_par(
            self._executor, [(m._m, r) for m, r in zip(matchers, rows, strict=True)], bitmask
        )
