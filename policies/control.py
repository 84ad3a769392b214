"""What the scheduler's control loops decide, as pure functions of what they observe.

Three loops run at their own periods (`ControlSettings`: fast 10 ms, mid 100 ms, slow 1 s):

- fast: anomalies → fall back to `baseline` behaviour (no lossy KV, no speculation) at
  once; memory pressure → a lossy KV profile, but only as far as the operator's quality
  budget (`POST /v1/run-context`) allows — without a budget, nothing lossy is switched on;
- mid: the recent window of full-precision tokens shrinks to none (only the unit decode
  is filling) under pressure and returns to the profile's when pressure is gone; the
  decode batch limit follows the expected batch size of the run context;
- slow: a profile the fast loop switched on is switched off again after a calm period,
  and a fallback is lifted after `fallback_hold_s` without anomalies.

Anomalies: the error rate of the last finished requests over `max_error_rate`, a replica
that stopped reporting or was seen dead, or the profile's measured quality cost beyond the
budget. Each decision says why, for logs and metrics.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

# Measured ΔPPL % per profile (wikitext-2, context 2048, default model, 16k tokens:
# `benchmarks/eval_kv_quality.py`, results/2026-11-22/kv_quality.json); a profile costing
# more than the quality budget is an anomaly while active. Refresh when the recipe changes.
PROFILE_DELTA_PPL_PCT: dict[str, float] = {
    "baseline": 0.0,
    "safe": 0.125,
    "balanced": 0.551,
    "aggressive": 2.833,
}
LOSSY_ORDER = ("aggressive", "balanced", "safe")  # most saving first
FALLBACK_POLICY = {"kv_profile": "baseline", "speculation": False}
SAVED_ON_FALLBACK = ("kv_profile", "speculation", "kv_window")  # restored when it lifts
CALM_BEFORE_UNDO_S = 5.0  # pressure must stay low this long before a profile is undone
PRESSURE_LOW = 0.5
MIN_BATCH_LIMIT = 8


@dataclass(frozen=True, slots=True)
class Observation:
    """What the loops see: the replicas' last reports and the recent outcomes."""

    now_s: float
    kv_usage: dict[str, float]  # decode replica → fraction of its KV budget in use
    last_report_s: dict[str, float]  # replica → time of its last report
    lost_replicas: int  # replicas callers saw die since the last look
    recent_errors: int
    recent_requests: int
    kv_profile: str
    quality_budget_pct: float | None  # from the run context (0.02 → 2.0), None = not given


@dataclass(frozen=True, slots=True)
class Decision:
    changes: dict  # RuntimePolicy changes ({} = none)
    reason: str
    fallback: bool = False  # this decision starts a fallback
    lifts_fallback: bool = False  # this decision ends one


@dataclass(slots=True)
class ControlState:
    """What the loops remember between ticks."""

    fallback_since_s: float | None = None
    saved_policy: dict | None = None  # the policy before the fallback
    auto_profile: str | None = None  # a profile the pressure rule switched on
    calm_since_s: float | None = None
    window_shrunk: bool = False
    outcomes: deque = field(default_factory=lambda: deque(maxlen=50))


def anomaly(obs: Observation, down_after_s: float, max_error_rate: float) -> str | None:
    """Why the app should fall back right now, or None."""
    if obs.lost_replicas:
        return f"{obs.lost_replicas} replica(s) lost"
    stale = [r for r, t in obs.last_report_s.items() if obs.now_s - t > down_after_s]
    if stale:
        return f"replica(s) {', '.join(sorted(stale))} silent for over {down_after_s:.1f} s"
    if obs.recent_requests >= 10 and obs.recent_errors / obs.recent_requests > max_error_rate:
        return f"error rate {obs.recent_errors}/{obs.recent_requests}"
    cost = PROFILE_DELTA_PPL_PCT.get(obs.kv_profile, 0.0)
    if obs.quality_budget_pct is not None and cost > obs.quality_budget_pct:
        return (
            f"profile {obs.kv_profile} costs ~{cost}% PPL, beyond the quality budget "
            f"{obs.quality_budget_pct}%"
        )
    return None


def pressure_profile(obs: Observation, high: float) -> str | None:
    """The lossy profile that memory pressure calls for, within the quality budget."""
    if obs.kv_profile != "baseline" or not obs.kv_usage or obs.quality_budget_pct is None:
        return None
    if max(obs.kv_usage.values()) < high:
        return None
    for name in LOSSY_ORDER:
        if PROFILE_DELTA_PPL_PCT[name] <= obs.quality_budget_pct:
            return name
    return None


def window_for(pressure: float, shrunk: bool, high: float, low: float) -> tuple[bool, int | None]:
    """(shrunk?, kv_window change) — None as the change means 'back to the profile's'.
    Shrunk = 0: only the unit decode is filling stays at full precision."""
    if pressure >= high and not shrunk:
        return True, 0
    if pressure <= low and shrunk:
        return False, None
    return shrunk, -1  # -1: no change


# --- one tick each: (state, what was seen) -> (next state, decision or None) ------------------
def fall_back(
    state: ControlState, now_s: float, why: str, policy: dict
) -> tuple[ControlState, Decision | None]:
    """An anomaly: start a fallback (saving the policy to restore), or, already in one,
    restart its hold (no new decision)."""
    if state.fallback_since_s is not None:
        return replace(state, fallback_since_s=now_s), None
    saved = {k: policy[k] for k in SAVED_ON_FALLBACK if k in policy}
    next_state = replace(state, fallback_since_s=now_s, saved_policy=saved, auto_profile=None)
    return next_state, Decision(dict(FALLBACK_POLICY), f"fallback: {why}", fallback=True)


def pressure_decision(
    state: ControlState, obs: Observation, high: float
) -> tuple[ControlState, Decision | None]:
    """Fast loop without an anomaly: a lossy profile under memory pressure (not during a
    fallback, and only within the quality budget)."""
    if state.fallback_since_s is not None:
        return state, None
    profile = pressure_profile(obs, high)
    if profile is None:
        return state, None
    next_state = replace(state, auto_profile=profile, calm_since_s=None)
    return next_state, Decision({"kv_profile": profile}, f"KV pressure → profile {profile}")


def slow_decision(
    state: ControlState,
    now_s: float,
    max_kv_usage: float | None,
    fallback_hold_s: float,
    calm_before_undo_s: float = CALM_BEFORE_UNDO_S,
    low: float = PRESSURE_LOW,
) -> tuple[ControlState, Decision | None]:
    """Slow loop: lift a fallback after `fallback_hold_s` without anomalies (restoring the
    saved policy); undo a pressure profile once usage stayed under `low` for
    `calm_before_undo_s` (a dip shorter than that restarts the wait)."""
    if state.fallback_since_s is not None:
        if now_s - state.fallback_since_s < fallback_hold_s:
            return state, None
        saved = state.saved_policy or {}
        next_state = replace(state, fallback_since_s=None, saved_policy=None)
        reason = "no anomaly since the fallback: policy restored"
        return next_state, Decision(dict(saved), reason, lifts_fallback=True)
    if state.auto_profile is None:
        return state, None
    if max_kv_usage is None or max_kv_usage >= low:
        return replace(state, calm_since_s=None), None
    calm_since = state.calm_since_s if state.calm_since_s is not None else now_s
    if now_s - calm_since < calm_before_undo_s:
        return replace(state, calm_since_s=calm_since), None
    next_state = replace(state, calm_since_s=calm_since, auto_profile=None)
    return next_state, Decision({"kv_profile": "baseline"}, "KV pressure gone → baseline")


def batch_limit(expected_batch_size: int) -> int:
    """Mid loop: the decode batch limit for the run context's expected batch size (room for
    bursts half again as large)."""
    return max(MIN_BATCH_LIMIT, int(expected_batch_size * 1.5))
