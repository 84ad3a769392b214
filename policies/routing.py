"""Replica choice, as a pure function of reported load (no Ray, no model).

Least-loaded: the replica with the fewest sequences — the larger of what it last reported
(running + waiting) and what the scheduler routed to it and has not seen finish — with KV
usage breaking ties.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


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


def is_alive(state: ReplicaState, now_s: float, stale_after_s: float) -> bool:
    return now_s - state.last_report_s <= stale_after_s


def least_loaded(replicas: Mapping[str, ReplicaState]) -> str | None:
    if not replicas:
        return None
    return min(replicas.values(), key=lambda r: (r.load, r.kv_usage, r.replica_id)).replica_id
