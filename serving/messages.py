"""What the deployments send each other (plain dataclasses, pickled by Ray)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from serving.engine.logprobs import TokenLogprobs
from serving.engine.sampling_params import SamplingParams


class Role(str, enum.Enum):
    INGRESS = "ingress"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True, slots=True)
class PrefillRequest:
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # Threads the prefill may use for this prompt: the scheduler grants the whole node while
    # decode there is idle (None: the replica's default share).
    num_threads: int | None = None


@dataclass(frozen=True, slots=True)
class PrefillResult:
    req_id: str
    first_token_id: int | None
    finished: bool
    finish_reason: str | None
    kv_key: str | None  # where the prompt's KV sits in the kv_store
    num_kv_blocks: int
    replica_id: str
    error: str | None = None
    # where the request asked for them: the first token's, and the prompt's
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None


@dataclass(frozen=True, slots=True)
class DecodeRequest:
    """`kv_key`/`first_token_id` set: continue from a prefill replica's KV in the store;
    both None: colocated, the decode replica prefills the prompt itself."""

    req_id: str
    prompt_token_ids: list[int]
    first_token_id: int | None
    params: SamplingParams
    kv_key: str | None
    subscriber_id: str  # the ingress replica whose stream carries this request's tokens
    # a chat turn: the decode replica that prefilled it stores its KV (prompt and answer)
    # when it finishes, for the next turn, which repeats both
    store_turn: bool = False
    # A stream resumed after its decode replica died: the tokens the client has already
    # received. The new replica prefills prompt + these (the stored prefix reused) and
    # continues after them, so the client sees one uninterrupted stream.
    resume_token_ids: list[int] = field(default_factory=list)
    # n > 1: the request whose choices this is one of; they share the prompt's KV blocks
    prompt_group: str | None = None
    group_size: int = 1  # n: how many choices the group has


# `TokenDelta.finish_reason` of the deltas that end a stream because its decode replica
# died (never sent to a client: the ingress resumes the stream elsewhere)
REPLICA_LOST = "replica_lost"


@dataclass(frozen=True, slots=True)
class TokenDelta:
    req_id: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[TokenLogprobs] | None = None  # one per token, where asked for
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # with the first token


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """A replica's periodic report to the scheduler actor."""

    role: Role
    replica_id: str
    num_running: int
    num_waiting: int
    kv_usage: float
    step_time_s: float  # EWMA of recent engine step durations
    metrics_text: str = ""
    reported_at: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True)
class RoutePlan:
    req_id: str
    prefill_replica: str | None  # None: prefill on the decode replica
    decode_replica: str
    prefill_threads: int | None = None
