"""The control loops' decisions (policies.control): anomalies, pressure, KV window."""

from __future__ import annotations

from policies.control import (
    CALM_BEFORE_UNDO_S,
    FALLBACK_POLICY,
    ControlState,
    Observation,
    anomaly,
    batch_limit,
    fall_back,
    pressure_decision,
    pressure_profile,
    slow_decision,
    window_for,
)


def _obs(**kw) -> Observation:
    base = dict(
        now_s=100.0, kv_usage={"d1": 0.2}, last_report_s={"d1": 99.9, "p1": 99.8},
        lost_replicas=0, recent_errors=0, recent_requests=0, kv_profile="baseline",
        quality_budget_pct=None,
    )  # fmt: skip
    return Observation(**(base | kw))


def test_healthy_app_has_no_anomaly() -> None:
    assert anomaly(_obs(), down_after_s=5, max_error_rate=0.5) is None


def test_each_anomaly_is_named() -> None:
    assert "lost" in anomaly(_obs(lost_replicas=1), 5, 0.5)
    assert "p1" in anomaly(_obs(last_report_s={"d1": 99.9, "p1": 90.0}), 5, 0.5)
    assert "error rate" in anomaly(_obs(recent_errors=6, recent_requests=10), 5, 0.5)
    # too few requests to judge a rate
    assert anomaly(_obs(recent_errors=3, recent_requests=3), 5, 0.5) is None
    # a profile that costs more than the operator's quality budget
    why = anomaly(_obs(kv_profile="aggressive", quality_budget_pct=1.0), 5, 0.5)
    assert "quality budget" in why
    assert anomaly(_obs(kv_profile="safe", quality_budget_pct=1.0), 5, 0.5) is None


def test_pressure_switches_on_the_most_saving_profile_the_budget_allows() -> None:
    hot = {"d1": 0.95}
    assert pressure_profile(_obs(kv_usage=hot), high=0.9) is None  # no budget: nothing lossy
    assert pressure_profile(_obs(kv_usage=hot, quality_budget_pct=0.0), 0.9) is None
    assert pressure_profile(_obs(kv_usage=hot, quality_budget_pct=0.5), 0.9) == "safe"
    assert pressure_profile(_obs(kv_usage=hot, quality_budget_pct=2.5), 0.9) == "balanced"
    assert pressure_profile(_obs(kv_usage=hot, quality_budget_pct=9.0), 0.9) == "aggressive"
    assert pressure_profile(_obs(kv_usage={"d1": 0.5}, quality_budget_pct=9.0), 0.9) is None
    # a profile already chosen (by the operator or earlier) is left alone
    busy = _obs(kv_usage=hot, quality_budget_pct=9.0, kv_profile="safe")
    assert pressure_profile(busy, 0.9) is None


def test_window_shrinks_under_pressure_and_comes_back() -> None:
    assert window_for(0.95, False, high=0.9, low=0.5) == (True, 0)
    assert window_for(0.95, True, 0.9, 0.5) == (True, -1)  # already shrunk: no change
    assert window_for(0.7, True, 0.9, 0.5) == (True, -1)  # between: hold
    assert window_for(0.3, True, 0.9, 0.5) == (False, None)  # back to the profile's
    assert window_for(0.3, False, 0.9, 0.5) == (False, -1)


# --- one tick at a time (issue 14, item 8): fallback hold, calm before undo -----------------
POLICY = {"kv_profile": "balanced", "speculation": True, "kv_window": 64, "max_num_seqs": 64}
HOLD_S = 30.0


def test_a_fallback_saves_the_policy_and_its_hold_restarts_with_each_anomaly() -> None:
    state, decision = fall_back(ControlState(auto_profile="safe"), 100.0, "lost", POLICY)
    assert decision.fallback and decision.changes == FALLBACK_POLICY
    assert state.saved_policy == {"kv_profile": "balanced", "speculation": True, "kv_window": 64}
    assert state.auto_profile is None  # the pressure profile is forgotten, not restored
    state, again = fall_back(state, 120.0, "error rate 6/10", POLICY | {"kv_profile": "baseline"})
    assert again is None and state.fallback_since_s == 120.0  # the hold restarts
    assert state.saved_policy["kv_profile"] == "balanced"  # still the policy before it all

    state, lift = slow_decision(state, 120.0 + HOLD_S - 0.1, 0.1, HOLD_S)
    assert lift is None  # held from the last anomaly, not the first
    state, lift = slow_decision(state, 120.0 + HOLD_S, 0.1, HOLD_S)
    assert lift.lifts_fallback and lift.changes == state_saved(POLICY)
    assert state.fallback_since_s is None and state.saved_policy is None


def state_saved(policy: dict) -> dict:
    return {k: policy[k] for k in ("kv_profile", "speculation", "kv_window")}


def test_no_pressure_profile_during_a_fallback() -> None:
    state, _ = fall_back(ControlState(), 100.0, "lost", POLICY)
    obs = _obs(kv_usage={"d1": 0.99}, quality_budget_pct=5.0)
    assert pressure_decision(state, obs, high=0.9) == (state, None)
    calm = ControlState()
    state, decision = pressure_decision(calm, obs, high=0.9)
    assert decision.changes == {"kv_profile": "aggressive"} and state.auto_profile == "aggressive"


def test_a_pressure_profile_is_undone_only_after_a_calm_period() -> None:
    state = ControlState(auto_profile="safe")
    state, d = slow_decision(state, 10.0, 0.3, HOLD_S)  # calm starts
    assert d is None and state.calm_since_s == 10.0
    state, d = slow_decision(state, 10.0 + CALM_BEFORE_UNDO_S - 0.1, 0.3, HOLD_S)
    assert d is None
    state, d = slow_decision(state, 14.0, 0.7, HOLD_S)  # pressure back: the wait restarts
    assert d is None and state.calm_since_s is None
    state, d = slow_decision(state, 15.0, 0.3, HOLD_S)
    state, d = slow_decision(state, 15.0 + CALM_BEFORE_UNDO_S - 0.1, 0.3, HOLD_S)
    assert d is None
    state, d = slow_decision(state, 15.0 + CALM_BEFORE_UNDO_S, 0.3, HOLD_S)
    assert d.changes == {"kv_profile": "baseline"} and state.auto_profile is None


def test_calm_at_time_zero_still_counts() -> None:
    state, _ = slow_decision(ControlState(auto_profile="safe"), 0.0, 0.1, HOLD_S)
    _, d = slow_decision(state, CALM_BEFORE_UNDO_S, 0.1, HOLD_S)
    assert d is not None  # a calm that began at t=0.0 is not mistaken for none


def test_nothing_to_undo_without_a_pressure_profile_or_reports() -> None:
    assert slow_decision(ControlState(), 50.0, 0.1, HOLD_S)[1] is None
    state = ControlState(auto_profile="safe", calm_since_s=1.0)
    state, d = slow_decision(state, 50.0, None, HOLD_S)  # no decode replica reports
    assert d is None and state.calm_since_s is None


def test_batch_limit_follows_the_expected_batch() -> None:
    assert batch_limit(2) == 8
    assert batch_limit(32) == 48
