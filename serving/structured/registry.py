"""Grammar backends by name; each factory imports its engine lazily, so only the chosen
engine's package has to be installed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from serving.structured.backend import GrammarBackend

GrammarEngine = Literal["xgrammar", "llguidance"]
# Chosen by benchmarks/grammar_engines.py on this CPU (results/2026-12-05/grammar/): every
# llguidance random walk gave valid JSON (xgrammar let 3 of 135 put a raw control character
# in a string, which no JSON parser accepts), and it compiles a schema ~14x faster (0.5 vs
# 7.4 ms median, 1.5 vs 119 ms worst); its slower mask (~14 vs ~3 us a row) is noise next
# to a decode step.
DEFAULT_GRAMMAR_ENGINE: GrammarEngine = "llguidance"


def _xgrammar(tokenizer: Any, **kw: Any) -> GrammarBackend:
    from serving.structured.xgrammar_backend import XGrammarBackend

    return XGrammarBackend(tokenizer, **kw)


def _llguidance(tokenizer: Any, **kw: Any) -> GrammarBackend:
    from serving.structured.llguidance_backend import LLGuidanceBackend

    return LLGuidanceBackend(tokenizer, **kw)


_FACTORIES: dict[str, Callable[..., GrammarBackend]] = {
    "xgrammar": _xgrammar,
    "llguidance": _llguidance,
}


def make_grammar_backend(
    tokenizer: Any,
    *,
    engine: GrammarEngine = DEFAULT_GRAMMAR_ENGINE,
    vocab_size: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    any_whitespace: bool = True,
    max_threads: int = 2,
) -> GrammarBackend:
    """A backend for one tokenizer (a Hugging Face fast tokenizer). Building one reads the
    whole vocabulary (~0.3 s for xgrammar, ~0.8 s for llguidance with SmolLM2): once per
    engine, not per request. `vocab_size` is the model's logits width."""
    if engine not in _FACTORIES:
        raise ValueError(f"unknown grammar engine {engine!r}; choose one of {sorted(_FACTORIES)}")
    return _FACTORIES[engine](
        tokenizer,
        vocab_size=vocab_size,
        stop_token_ids=stop_token_ids,
        any_whitespace=any_whitespace,
        max_threads=max_threads,
    )
