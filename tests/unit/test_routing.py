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


# --- session affinity and the P/D choice (policies.routing.route) ----------------------
from policies.routing import AFFINITY_SLACK, AUTO_MIN_PREFILL_TOKENS, route  # noqa: E402


def test_a_session_stays_with_its_decode_replica_until_it_is_much_busier() -> None:
    decode = _replicas(ReplicaState("d1", num_running=3), ReplicaState("d2", num_running=1))
    r = route({}, decode, 100, "colocated", session_replica="d1")
    assert (r.decode_replica, r.decode_reason) == ("d1", "affinity")
    decode["d1"].num_running = 1 + AFFINITY_SLACK + 1
    r = route({}, decode, 100, "colocated", session_replica="d1")
    assert (r.decode_replica, r.decode_reason) == ("d2", "least_loaded")


def test_a_session_whose_replica_is_gone_moves_to_the_least_loaded() -> None:
    decode = _replicas(ReplicaState("d2", num_running=2), ReplicaState("d3", num_running=0))
    r = route({}, decode, 100, "colocated", session_replica="d1")
    assert (r.decode_replica, r.decode_reason) == ("d3", "least_loaded")


def test_no_decode_replica_means_no_route() -> None:
    assert route(_replicas(ReplicaState("p1")), {}, 100, "disaggregated") is None


def test_prefill_choice_by_mode_prompt_length_and_prefill_load() -> None:
    prefill = _replicas(ReplicaState("p1"), ReplicaState("p2", num_running=1))
    decode = _replicas(ReplicaState("d1"))
    long = AUTO_MIN_PREFILL_TOKENS
    assert route(prefill, decode, 10, "disaggregated").prefill_replica == "p1"
    r = route(prefill, decode, long, "colocated")
    assert (r.prefill_replica, r.prefill_reason) == (None, "colocated")
    r = route(prefill, decode, long - 1, "auto")
    assert (r.prefill_replica, r.prefill_reason) == (None, "short_prompt")
    assert route(prefill, decode, long, "auto").prefill_replica == "p1"
    prefill["p1"].num_assigned = prefill["p2"].num_assigned = 2  # every prefill replica busy
    r = route(prefill, decode, long, "auto")
    assert (r.prefill_replica, r.prefill_reason) == (None, "prefill_busy")
    decode["d1"].num_running = 5  # ... unless decode is busy too: then split anyway
    assert route(prefill, decode, long, "auto").prefill_replica is not None
    r = route({}, decode, long, "disaggregated")
    assert (r.prefill_replica, r.prefill_reason) == (None, "no_prefill_replica")
