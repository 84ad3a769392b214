"""Least-loaded replica choice and liveness, as pure functions of reported load."""

from __future__ import annotations

from policies.routing import ReplicaState, is_alive, least_loaded


def _replicas(*states: ReplicaState) -> dict[str, ReplicaState]:
    return {s.replica_id: s for s in states}


def test_no_replicas() -> None:
    assert least_loaded({}) is None


def test_picks_the_fewest_loaded() -> None:
    replicas = _replicas(
        ReplicaState("a", num_running=4, num_waiting=1),
        ReplicaState("b", num_running=2, num_waiting=1),
        ReplicaState("c", num_running=3, num_waiting=3),
    )
    assert least_loaded(replicas) == "b"
    replicas["b"].num_waiting = 5
    assert least_loaded(replicas) == "a"


def test_waiting_requests_count_as_load() -> None:
    replicas = _replicas(
        ReplicaState("a", num_running=1, num_waiting=4),
        ReplicaState("b", num_running=3, num_waiting=0),
    )
    assert replicas["a"].load == 5 and replicas["b"].load == 3
    assert least_loaded(replicas) == "b"


def test_num_assigned_counts_when_reports_lag() -> None:
    # "a" last reported an empty engine, but the scheduler has since routed 6 requests to it
    replicas = _replicas(
        ReplicaState("a", num_running=0, num_assigned=6),
        ReplicaState("b", num_running=2, num_waiting=1, num_assigned=1),
    )
    assert replicas["a"].load == 6 and replicas["b"].load == 3
    assert least_loaded(replicas) == "b"
    # and a fresh report larger than the assigned count wins over it
    replicas["b"].num_running = 9
    assert replicas["b"].load == 10
    assert least_loaded(replicas) == "a"


def test_ties_broken_by_kv_usage_then_id() -> None:
    replicas = _replicas(
        ReplicaState("a", num_running=2, kv_usage=0.7),
        ReplicaState("b", num_running=2, kv_usage=0.2),
        ReplicaState("c", num_running=2, kv_usage=0.5),
        ReplicaState("d", num_running=3, kv_usage=0.0),
    )
    assert least_loaded(replicas) == "b"
    replicas["b"].kv_usage = 0.7
    replicas["c"].kv_usage = 0.7
    assert least_loaded(replicas) == "a"  # full tie: deterministic by id


def test_load_beats_kv_usage() -> None:
    replicas = _replicas(
        ReplicaState("busy", num_running=5, kv_usage=0.0),
        ReplicaState("full", num_running=1, kv_usage=0.99),
    )
    assert least_loaded(replicas) == "full"


def test_is_alive_staleness() -> None:
    s = ReplicaState("a", last_report_s=100.0)
    assert is_alive(s, now_s=100.0, stale_after_s=5.0)
    assert is_alive(s, now_s=105.0, stale_after_s=5.0)  # the boundary still counts
    assert not is_alive(s, now_s=105.001, stale_after_s=5.0)
    assert not is_alive(ReplicaState("never"), now_s=1000.0, stale_after_s=5.0)
