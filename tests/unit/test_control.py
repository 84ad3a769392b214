"""The control loops' decisions (policies.control): anomalies, pressure, KV window."""

from __future__ import annotations

from policies.control import Observation, anomaly, pressure_profile, window_for


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
