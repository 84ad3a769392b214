"""The scheduler actor's routing state, exercised as a plain object (no Ray needed)."""

from __future__ import annotations

import asyncio
import os

from deployments.scheduler import SchedulerActor
from serving.config import InferosConfig
from serving.messages import ReplicaLoad, Role


def _scheduler(pd_mode: str = "disaggregated") -> SchedulerActor:
    sched = SchedulerActor(
        InferosConfig.model_validate({"scheduling": {"pd_mode": pd_mode}}).model_dump()
    )
    for role, rid in ((Role.PREFILL, "p1"), (Role.DECODE, "d1"), (Role.DECODE, "d2")):
        asyncio.run(sched.report(ReplicaLoad(role, rid, 0, 0, 0.0, 0.0)))
    return sched


def test_least_loaded_decode_and_whole_node_prefill_only_while_decode_is_idle() -> None:
    sched = _scheduler()
    first = asyncio.run(sched.route("a", 10))
    second = asyncio.run(sched.route("b", 10))
    third = asyncio.run(sched.route("c", 10))
    assert first.prefill_replica == "p1"
    assert {first.decode_replica, second.decode_replica} == {"d1", "d2"}  # spread
    assert first.prefill_threads == (os.cpu_count() or 1)  # its decode replica was idle
    assert second.prefill_threads == (os.cpu_count() or 1)  # so was the other one
    assert third.prefill_threads is None  # both decode replicas busy now: default share
    asyncio.run(sched.finished("a"))
    asyncio.run(sched.finished("b"))
    asyncio.run(sched.finished("c"))
    snap = asyncio.run(sched.snapshot())
    assert snap["in_flight"] == 0
    assert all(s["num_assigned"] == 0 for s in snap["decode"].values())


def test_colocated_mode_routes_without_prefill_replica() -> None:
    sched = _scheduler("colocated")
    plan = asyncio.run(sched.route("a", 10))
    assert plan.prefill_replica is None and plan.prefill_threads is None
    asyncio.run(sched.set_pd_mode("disaggregated"))
    assert asyncio.run(sched.route("b", 10)).prefill_replica == "p1"


def test_no_decode_replica_means_no_plan() -> None:
    sched = SchedulerActor(InferosConfig().model_dump())
    assert asyncio.run(sched.route("a", 10)) is None


def test_sessions_keep_their_decode_replica_across_turns() -> None:
    sched = _scheduler("colocated")

    async def turns() -> list[str]:
        chosen = []
        for turn in range(3):  # both sessions' turns run at the same time, then finish
            for session in ("a", "b"):
                plan = await sched.route(f"{session}{turn}", 10, session_id=session)
                chosen.append((session, plan.decode_replica))
            for session in ("a", "b"):
                await sched.finished(f"{session}{turn}")
        return chosen

    chosen = asyncio.run(turns())
    by_session = {s: {r for s2, r in chosen if s2 == s} for s, _ in chosen}
    assert all(len(replicas) == 1 for replicas in by_session.values()), by_session
    assert by_session["a"] != by_session["b"]  # two sessions spread over both replicas


def test_a_lost_replica_makes_the_app_fall_back_to_baseline_and_say_so() -> None:
    sched = _scheduler()

    async def scenario() -> tuple[str, bool, str, float]:
        await sched.set_policy({"kv_profile": "balanced", "speculation": True})
        await sched.forget("d2")
        await sched.control._fast()  # one fast tick (10 ms in the running app)
        policy = await sched.get_policy()
        text = sched.metrics.exposition()
        return policy.kv_profile, policy.speculation, text, sched.control.snapshot()

    profile, speculation, text, snap = asyncio.run(scenario())
    assert (profile, speculation) == ("baseline", False)
    assert snap["fallback_active"] and snap["num_fallbacks"] == 1
    assert "inferos:policy_fallbacks_total" in text
    active = 'inferos:policy_fallback_active{model="default",replica="0",role="scheduler"} 1.0'
    assert active in text


def test_readiness_waits_for_the_replicas_the_config_starts() -> None:
    """One answer for /health and /v1/health: a decode replica, plus a prefill replica
    where the config starts one (not where one engine serves the node)."""
    for prefill_replicas, has_prefill in ((1, True), (0, False)):
        config = InferosConfig.model_validate({"prefill": {"num_replicas": prefill_replicas}})
        assert config.has_prefill_replicas is has_prefill
        sched = SchedulerActor(config.model_dump())
        assert not asyncio.run(sched.readiness())["ready"]
        asyncio.run(sched.report(ReplicaLoad(Role.DECODE, "d1", 0, 0, 0.0, 0.0)))
        assert asyncio.run(sched.readiness())["ready"] is not has_prefill
        asyncio.run(sched.report(ReplicaLoad(Role.PREFILL, "p1", 0, 0, 0.0, 0.0)))
        ready = asyncio.run(sched.readiness())
        assert ready["ready"] and ready["replicas"] == {"prefill": 1, "decode": 1}
