"""Per-request sampling settings, the engine's view of an OpenAI request."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    # Stop strings are matched on text, by whoever detokenizes (the ingress).
    stop: tuple[str, ...] = field(default=())
    ignore_eos: bool = False
    min_tokens: int = 0
    # Staged-KV profile for this request (None: the engine's current one).
    kv_profile: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5 or self.top_k == 1
