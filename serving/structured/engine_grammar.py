"""Structured output inside one engine: the grammar state a constrained sequence carries,
and the per-engine machinery that makes it (a backend built once from the engine's
tokenizer, its compiled-grammar cache, the batch masker).

    replica, on admission (off the engine thread):
        seq.grammar = engine_grammar.state_for(seq.params.structured, seq.output_token_ids)
    engine thread, every step:
        sampler → logits_processors.process → mask_rows (one bitmask fill for the batch)
        LLMEngine.commit → seq.grammar.advance(token) per committed token

Only the spec travels between replicas (`SamplingParams.structured`, a small frozen
value); each replica compiles it through its own cache and replays the tokens already
chosen elsewhere (the prefill's first token, a resumed stream's) into a fresh matcher.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from serving.structured.backend import GrammarBackend, GrammarMatcher, allocate_bitmask
from serving.structured.cache import GrammarCache
from serving.structured.logits_mask import apply_bitmask_inplace
from serving.structured.request import InvalidStructuredOutput
from serving.structured.spec import StructuredSpec

if TYPE_CHECKING:
    from serving.engine.logits_processors import Row

logger = logging.getLogger(__name__)


class GrammarState:
    """One sequence's matcher plus the engine's masker. Owned by the sequence; used on the
    engine thread only."""

    __slots__ = ("masker", "matcher", "spec")

    def __init__(self, matcher: GrammarMatcher, masker: BatchMasker, spec: StructuredSpec):
        self.matcher = matcher
        self.masker = masker
        self.spec = spec

    def advance(self, token_id: int) -> bool:
        """Accept one committed token; True when the output is complete (a stop token
        accepted) or the grammar refused it. A refusal cannot happen for a token sampled
        under the mask; it would mean a masked-out row (e.g. min_tokens banning the only
        allowed stop token), and ending the sequence is the only sound answer."""
        if not self.matcher.accept_token(token_id):
            logger.warning("grammar refused committed token %d: finishing the sequence", token_id)
            return True
        return self.matcher.is_terminated()


class BatchMasker:
    """The engine's bitmask buffer and backend; `mask_rows` fills and applies it."""

    def __init__(self, backend: GrammarBackend, max_num_rows: int = 8) -> None:
        self.backend = backend
        self._bitmask = allocate_bitmask(max_num_rows, backend.vocab_size)

    def buffer(self, num_rows: int) -> torch.Tensor:
        if num_rows > self._bitmask.shape[0]:
            self._bitmask = allocate_bitmask(num_rows, self.backend.vocab_size)
        view = self._bitmask[:num_rows]
        view.fill_(-1)  # rows nobody fills (past a refused draft token) allow everything
        return view


def mask_rows(logits: torch.Tensor, rows: Sequence[Row]) -> None:
    """`logits [len(rows), vocab]`, in place: -inf wherever a constrained row's grammar
    forbids the token. A row with drafted tokens before it (speculation) is masked by the
    grammar's state after them. Unconstrained rows are not touched; a batch without a
    constrained row costs one scan of `rows`."""
    index = [i for i, r in enumerate(rows) if r.seq.grammar is not None]
    if not index:
        return
    states: list[GrammarState] = [rows[i].seq.grammar for i in index]  # type: ignore[misc]
    live = [k for k, s in enumerate(states) if not s.matcher.is_terminated()]
    if not live:
        return
    masker = states[0].masker
    bitmask = masker.buffer(len(live))  # [len(live), words]
    plain = [k for k in live if not rows[index[k]].extra]
    if plain:  # one (parallel) fill for the rows without drafts before them
        masker.backend.fill_bitmasks(
            [states[k].matcher for k in plain], [live.index(k) for k in plain], bitmask
        )
    for pos, k in enumerate(live):
        extra = rows[index[k]].extra
        if extra:
            _fill_after(states[k].matcher, extra, bitmask, pos)
    apply_bitmask_inplace(logits, bitmask, [index[k] for k in live])


def _fill_after(
    matcher: GrammarMatcher, extra: tuple[int, ...], bitmask: torch.Tensor, row: int
) -> None:
    """`bitmask[row]` ← the mask after `extra`; left all-allowed if the grammar refuses
    one of them or stops before them (verification never reads such a row: it stops at
    the refused draft token, which the row before forbids)."""
    num_accepted = 0
    for t in extra:
        if matcher.is_terminated() or not matcher.accept_token(t):
            break
        num_accepted += 1
    if num_accepted == len(extra) and not matcher.is_terminated():
        matcher.fill_bitmask(bitmask, row)
    matcher.rollback(num_accepted)


class EngineGrammar:
    """One engine's structured output: built once from its tokenizer (reading the whole
    vocabulary, ~1 s), thread-safe `state_for` (compiles through the cache)."""

    def __init__(self, backend: GrammarBackend, max_cached: int = 256) -> None:
        self.backend = backend
        self.cache = GrammarCache(backend, max_cached)
        self.masker = BatchMasker(backend)

    def state_for(self, spec: StructuredSpec, output_token_ids: Sequence[int] = ()) -> GrammarState:
        """A fresh state for a sequence constrained by `spec` that has already produced
        `output_token_ids` elsewhere; `InvalidStructuredOutput` when the engine refuses the
        spec or those tokens."""
        matcher = self.cache.new_matcher(spec)
        for t in output_token_ids:
            if not matcher.accept_token(t):
                raise InvalidStructuredOutput(
                    f"token {t} produced before this replica does not match the grammar"
                )
        return GrammarState(matcher, self.masker, spec)


class LazyEngineGrammar:
    """Builds the `EngineGrammar` on first use (a replica that never sees a constrained
    request never reads the vocabulary into a grammar engine)."""

    def __init__(self, build: Callable[[], EngineGrammar]) -> None:
        self._build = build
        self._grammar: EngineGrammar | None = None
        self._lock = threading.Lock()

    def get(self) -> EngineGrammar:
        with self._lock:
            if self._grammar is None:
                self._grammar = self._build()
            return self._grammar


def build_engine_grammar(
    tokenizer: Any,
    vocab_size: int,
    stop_token_ids: Sequence[int],
    engine: str | None = None,
    any_whitespace: bool = False,
) -> EngineGrammar:
    from serving.structured.registry import DEFAULT_GRAMMAR_ENGINE, make_grammar_backend

    backend = make_grammar_backend(
        tokenizer,
        engine=engine or DEFAULT_GRAMMAR_ENGINE,  # type: ignore[arg-type]
        vocab_size=vocab_size,
        stop_token_ids=list(stop_token_ids),
        any_whitespace=any_whitespace,
        max_threads=2,
    )
    return EngineGrammar(backend)


def grammar_for_model(
    model_path: Any,
    stop_token_ids: Sequence[int],
    engine: str | None = None,
    any_whitespace: bool = False,
) -> EngineGrammar:
    """The `EngineGrammar` of a served model folder: its tokenizer, and the logits width
    its config.json states (the bitmask's width)."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    config = Path(model_path) / "config.json"
    vocab_size = len(tokenizer)
    if config.is_file():
        vocab_size = json.loads(config.read_text()).get("vocab_size", vocab_size)
    return build_engine_grammar(tokenizer, vocab_size, stop_token_ids, engine, any_whitespace)
