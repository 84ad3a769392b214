"""Replica choice per request, as pure functions of reported load (no Ray, no model).

Decode: a session stays with the decode replica that served its last turn (its KV, and the
prefix cache of its prompts, are warm there) unless that replica is down or carries
`AFFINITY_SLACK` more sequences than the least loaded one; otherwise least-loaded — the
replica with the fewest sequences (the larger of what it last reported, running + waiting,
and what the scheduler routed to it and has not seen finish), KV usage breaking ties.

Prefill: `disaggregated` always uses a prefill replica, `colocated` never does; `auto`
decides per request: a short prompt (under `AUTO_MIN_PREFILL_TOKENS`) costs less to prefill
on the decode replica than to ship its KV, and so does any prompt while every prefill
replica is busy and the chosen decode replica is not (its queue would wait for nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

AFFINITY_SLACK = 4
AUTO_MIN_PREFILL_TOKENS = 256
PREFILL_BUSY = 2  # prompts in flight on a prefill replica from which it counts as busy


@dataclass(slots=True)
class ReplicaState:
    replica_id: str
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    step_time_s: float = 0.0
    num_assigned: int = 0  # routed here and not finished yet (the scheduler's own count)
    last_report_s: float = 0.0

    @property
    def load(self) -> int:
        return max(self.num_running + self.num_waiting, self.num_assigned)


@dataclass(frozen=True, slots=True)
class Route:
    decode_replica: str
    prefill_replica: str | None
    decode_reason: str  # "affinity" | "least_loaded"
    # "disaggregated" | "colocated" | "short_prompt" | "prefill_busy" | "no_prefill_replica"
    prefill_reason: str


def is_alive(state: ReplicaState, now_s: float, stale_after_s: float) -> bool:
    return now_s - state.last_report_s <= stale_after_s


def least_loaded(replicas: Mapping[str, ReplicaState]) -> str | None:
    if not replicas:
        return None
    return min(replicas.values(), key=lambda r: (r.load, r.kv_usage, r.replica_id)).replica_id


def choose_decode(
    replicas: Mapping[str, ReplicaState], session_replica: str | None
) -> tuple[str, str] | None:
    """(replica, reason) among live `replicas`, or None when there is none."""
    best = least_loaded(replicas)
    if best is None:
        return None
    if session_replica is not None and session_replica in replicas:
        if replicas[session_replica].load <= replicas[best].load + AFFINITY_SLACK:
            return session_replica, "affinity"
    return best, "least_loaded"


def choose_prefill(
    replicas: Mapping[str, ReplicaState],
    decode: ReplicaState,
    num_prompt_tokens: int,
    pd_mode: str,
) -> tuple[str | None, str]:
    """(prefill replica or None = prefill on the decode replica, reason)."""
    if pd_mode == "colocated":
        return None, "colocated"
    best = least_loaded(replicas)
    if best is None:
        return None, "no_prefill_replica"
    if pd_mode == "auto":
        if num_prompt_tokens < AUTO_MIN_PREFILL_TOKENS:
            return None, "short_prompt"
        if replicas[best].load >= PREFILL_BUSY and decode.load < PREFILL_BUSY:
            return None, "prefill_busy"
    return best, "disaggregated"


def route(
    prefill: Mapping[str, ReplicaState],
    decode: Mapping[str, ReplicaState],
    num_prompt_tokens: int,
    pd_mode: str,
    session_replica: str | None = None,
) -> Route | None:
    """The whole decision for one request; None when no decode replica is alive."""
    chosen = choose_decode(decode, session_replica)
    if chosen is None:
        return None
    decode_id, decode_reason = chosen
    prefill_id, prefill_reason = choose_prefill(
        prefill, decode[decode_id], num_prompt_tokens, pd_mode
    )
    return Route(decode_id, prefill_id, decode_reason, prefill_reason)
