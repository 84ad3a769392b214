"""A request's state inside one engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from serving.engine.logprobs import TokenLogprobs
from serving.engine.sampling_params import SamplingParams
from serving.kv.block_format import KVPayload

if TYPE_CHECKING:
    from serving.structured.engine_grammar import GrammarState


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(eq=False)
class Sequence:
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # Tokens sampled elsewhere before this engine saw the request (the prefill's first token).
    output_token_ids: list[int] = field(default_factory=list)
    # KV computed elsewhere for the first `kv_import.num_tokens` tokens.
    kv_import: KVPayload | None = None
    # Hand the prompt's KV back instead of freeing it when the request finishes.
    export_kv: bool = False
    # Hand the KV of everything computed back when it finishes (a turn the next may reuse).
    export_kv_at_finish: bool = False
    max_model_len: int = 2048
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    num_preemptions: int = 0
    # Logprobs of prompt tokens 1.. gathered over the prompt's chunks (params.prompt_logprobs),
    # handed out with the first output token.
    prompt_logprobs: list[TokenLogprobs] | None = None
    # Structured output (params.structured): the grammar's state after the output tokens,
    # set by the replica before the engine sees the sequence.
    grammar: GrammarState | None = None
    # The choices of one request with n > 1 (same prompt) share a group: the first to be
    # admitted computes the prompt, the others share its full prompt blocks.
    prompt_group: str | None = None
    group_size: int = 1  # the request's n

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        if start >= n_prompt:  # decode: no copy of the whole history per step
            return self.output_token_ids[start - n_prompt : end - n_prompt]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens
