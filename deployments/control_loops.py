"""The scheduler actor's three control loops (fast, mid, slow), on its event loop.

The decisions are `policies.control` (pure); this module observes the scheduler's state,
applies decisions through `SchedulerActor.set_policy` (so replicas follow within one report
period) and says what it did in logs and metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from policies.control import (
    PRESSURE_LOW,
    ControlState,
    Decision,
    Observation,
    anomaly,
    batch_limit,
    fall_back,
    pressure_decision,
    slow_decision,
    window_for,
)
from policies.routing import ReplicaState
from policies.run_context import RunContext
from policies.runtime import RuntimePolicy
from serving.config import ControlSettings
from serving.messages import Role
from serving.metrics import SchedulerMetrics

logger = logging.getLogger(__name__)


class ControlledScheduler(Protocol):
    """What the loops observe and change: the scheduler actor's state
    (`deployments.scheduler.SchedulerActor`, which owns the loops; named here by shape so
    the two modules do not import each other)."""

    replicas: dict[Role, dict[str, ReplicaState]]
    policy: RuntimePolicy
    run_context: RunContext | None
    metrics: SchedulerMetrics

    async def set_policy(self, changes: dict) -> RuntimePolicy: ...

    def publish_quality_estimate(self) -> None: ...


class ControlLoops:
    def __init__(self, scheduler: ControlledScheduler, settings: ControlSettings):
        self.scheduler = scheduler
        self.settings = settings
        self.state = ControlState()
        self.lost_replicas = 0
        self.last_reason: str | None = None
        self.num_fallbacks = 0
        self.ticks = {"fast": 0, "mid": 0, "slow": 0}
        self._tasks: list[asyncio.Task] = []

    # --- inputs -------------------------------------------------------------------------
    def ensure_started(self) -> None:
        """Start the loops on the actor's event loop (called from its first async call)."""
        if self._tasks or not self.settings.enabled:
            return
        self.scheduler.publish_quality_estimate()  # the profile set at start
        s = self.settings
        for name, period, tick in (
            ("fast", s.fast_period_s, self._fast),
            ("mid", s.mid_period_s, self._mid),
            ("slow", s.slow_period_s, self._slow),
        ):
            task = asyncio.get_running_loop().create_task(self._run(name, period, tick))
            self._tasks.append(task)

    def record_outcome(self, error: bool) -> None:
        self.state.outcomes.append(error)

    def replica_lost(self, replica_id: str) -> None:
        self.lost_replicas += 1
        logger.warning("control: replica %s reported lost", replica_id)

    # --- loops --------------------------------------------------------------------------
    async def _run(self, name: str, period: float, tick) -> None:
        while True:
            try:
                await tick()
                self.ticks[name] += 1
            except Exception:  # a bad tick must not stop the loop
                logger.exception("control loop %s failed", name)
            await asyncio.sleep(period)

    def _observe(self) -> Observation:
        sched = self.scheduler
        decode = sched.replicas[Role.DECODE]
        every = {**sched.replicas[Role.PREFILL], **decode}
        budget = sched.run_context.quality_budget if sched.run_context else None
        outcomes = self.state.outcomes
        return Observation(
            now_s=time.time(),
            kv_usage={r: s.kv_usage for r, s in decode.items()},
            last_report_s={r: s.last_report_s for r, s in every.items()},
            lost_replicas=self.lost_replicas,
            recent_errors=sum(outcomes),
            recent_requests=len(outcomes),
            kv_profile=sched.policy.kv_profile,
            quality_budget_pct=None if budget is None else budget * 100,
        )

    async def _fast(self) -> None:
        obs = self._observe()
        why = anomaly(obs, self.settings.replica_down_after_s, self.settings.max_error_rate)
        self.lost_replicas = 0
        if why is not None:
            self.state.outcomes.clear()  # judge the new state on new outcomes
            self._prune_silent(obs)
            policy = self.scheduler.policy.model_dump()
            self.state, decision = fall_back(self.state, time.time(), why, policy)
        else:
            self.state, decision = pressure_decision(self.state, obs, self.settings.pressure_high)
        await self._carry_out(decision)

    async def _mid(self) -> None:
        sched = self.scheduler
        if self.state.fallback_since_s is not None:
            return
        usage = [s.kv_usage for s in sched.replicas[Role.DECODE].values()]
        if sched.policy.kv_profile != "baseline" and usage:
            shrunk, window = window_for(
                max(usage), self.state.window_shrunk, self.settings.pressure_high, PRESSURE_LOW
            )
            if window != -1:
                self.state.window_shrunk = shrunk
                await self._apply({"kv_window": window}, f"KV window → {window}")
        ctx = sched.run_context
        if ctx is not None and ctx.expected_batch_size is not None:
            limit = batch_limit(ctx.expected_batch_size)
            if sched.policy.max_num_seqs != limit:
                await self._apply({"max_num_seqs": limit}, f"batch limit → {limit}")

    async def _slow(self) -> None:
        usage = [s.kv_usage for s in self.scheduler.replicas[Role.DECODE].values()]
        self.state, decision = slow_decision(
            self.state, time.time(), max(usage, default=None), self.settings.fallback_hold_s
        )
        await self._carry_out(decision)

    def _prune_silent(self, obs: Observation) -> None:
        """Forget replicas that stopped reporting (Serve replaces a dead replica under a
        new id), so the anomaly they raised clears once it has been acted on."""
        limit = self.settings.replica_down_after_s
        for pool in self.scheduler.replicas.values():
            for rid in [r for r, s in pool.items() if obs.now_s - s.last_report_s > limit]:
                del pool[rid]
                logger.warning("control: replica %s silent for over %.1f s: forgotten", rid, limit)

    # --- actions ------------------------------------------------------------------------
    async def _carry_out(self, decision: Decision | None) -> None:
        if decision is None:
            return
        if decision.fallback:
            self.num_fallbacks += 1
            self.scheduler.metrics.fallback(decision.reason)
            logger.warning("control: FALLBACK to baseline behaviour: %s", decision.reason)
        if decision.lifts_fallback:
            self.scheduler.metrics.fallback_active.set(0)
        await self._apply(decision.changes, decision.reason)

    async def _apply(self, changes: dict, reason: str) -> None:
        policy = self.scheduler.policy.model_dump()
        changes = {k: v for k, v in changes.items() if policy.get(k) != v}
        if not changes:
            return
        await self.scheduler.set_policy(changes)
        self.last_reason = reason
        self.scheduler.metrics.control_action(next(iter(changes)))
        logger.info("control: %s (%s)", reason, changes)

    def snapshot(self) -> dict:
        st = self.state
        return {
            "ticks": dict(self.ticks),
            "fallback_active": st.fallback_since_s is not None,
            "num_fallbacks": self.num_fallbacks,
            "auto_profile": st.auto_profile,
            "last_action": self.last_reason,
        }
