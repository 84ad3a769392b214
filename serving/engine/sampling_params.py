"""Per-request sampling settings, the engine's view of an OpenAI request."""

from __future__ import annotations

from dataclasses import dataclass, field

from serving.structured.spec import StructuredSpec


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    # Stop strings are matched on text, by whoever detokenizes (the ingress).
    stop: tuple[str, ...] = field(default=())
    include_stop_str_in_output: bool = False  # also the ingress's
    ignore_eos: bool = False
    min_tokens: int = 0
    # vLLM's penalties: presence/frequency over the output tokens (subtracted), repetition
    # over prompt and output (a seen token's logit divided if positive, multiplied if not).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    # Token sequences that may not be completed: the last token of each is banned where the
    # output so far ends with the others (a one-token word is always banned).
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    # Logprobs (raw model output): None = off; N = the sampled token's plus the N best.
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for every prompt token but the first
    # Staged-KV profile for this request (None: the engine's current one).
    kv_profile: str | None = None
    # Structured output: what the output must match (None: unconstrained). Each engine
    # compiles it through its own grammar cache (`serving.structured.engine_grammar`).
    structured: StructuredSpec | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    @property
    def adjusts_logits(self) -> bool:
        """Anything beyond min_tokens changes this request's logits before sampling (the
        sampler's fast path skips requests that answer False)."""
        return self.has_penalties or bool(self.logit_bias) or bool(self.bad_words_ids)
