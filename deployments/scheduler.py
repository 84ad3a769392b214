"""The `scheduler` actor: the one place routing decisions are made.

Replicas report their load every few hundred milliseconds (and push their metrics text
with it); the ingress asks `route()` for each request and says `finished()` at the end.
The decision itself is `policies.routing` (pure); this actor only keeps the state.
"""

from __future__ import annotations

import logging
import os
import time

import ray

from deployments.actors import SCHEDULER_NAME, get_or_create
from deployments.control_loops import ControlLoops
from deployments.kv_store import kv_store_actor
from policies.control import PROFILE_DELTA_PPL_PCT
from policies.routing import ReplicaState, choose_decode, is_alive, route
from policies.run_context import RunContext
from policies.runtime import RuntimePolicy
from serving.config import InferosConfig
from serving.messages import ReplicaLoad, Role, RoutePlan
from serving.metrics import SchedulerMetrics

logger = logging.getLogger(__name__)

STALE_AFTER_S = 10.0
MAX_SESSIONS = 100_000  # remembered session → replica affinities (oldest forgotten first)


class SchedulerActor:
    def __init__(self, config: dict):
        cfg = InferosConfig.model_validate(config)
        self.config_dict = config
        self.replicas: dict[Role, dict[str, ReplicaState]] = {Role.PREFILL: {}, Role.DECODE: {}}
        self.metrics_texts_by_replica: dict[str, str] = {}
        self.ingress_texts: dict[str, tuple[float, str]] = {}  # replica → (time, text)
        self.assignments: dict[str, tuple[str | None, str]] = {}  # req_id → (prefill, decode)
        self.metrics = SchedulerMetrics(cfg.model.served_model_name or "default")
        self.policy = RuntimePolicy(
            pd_mode=cfg.scheduling.pd_mode,
            kv_profile=cfg.kv_cache.profile,
            speculation=cfg.speculation.enabled,
        )
        self.node_cpus = os.cpu_count() or 1  # NOTE: assumes prefill and decode share a node
        self.max_model_len = cfg.model.max_model_len
        # where one engine serves the node (pd_mode auto on CPU) no prefill replica starts
        self.has_prefill_replicas = cfg.has_prefill_replicas
        self.run_context: RunContext | None = None
        self.num_routed = 0
        # session id → decode replica of its last turn (insertion order = age)
        self.sessions: dict[str, str] = {}
        self.control = ControlLoops(self, cfg.control)
        self._push_kv_profile()  # a store started before us (or restarted) follows ours

    @property
    def pd_mode(self) -> str:
        return self.policy.pd_mode

    async def report(self, load: ReplicaLoad) -> RuntimePolicy:
        """Record a replica's load; the answer is the current policy, so every replica
        follows a change within one report period."""
        pool = self.replicas[load.role]
        state = pool.get(load.replica_id)
        if state is None:
            logger.info("%s replica %s registered", load.role.value, load.replica_id)
            state = pool[load.replica_id] = ReplicaState(load.replica_id)
        state.num_running, state.num_waiting = load.num_running, load.num_waiting
        state.kv_usage, state.step_time_s = load.kv_usage, load.step_time_s
        state.last_report_s = time.time()
        if load.metrics_text:
            self.metrics_texts_by_replica[load.replica_id] = load.metrics_text
        return self.policy

    def _alive(self, role: Role) -> dict[str, ReplicaState]:
        now = time.time()
        return {k: v for k, v in self.replicas[role].items() if is_alive(v, now, STALE_AFTER_S)}

    async def route(
        self, req_id: str, num_prompt_tokens: int, session_id: str | None = None
    ) -> RoutePlan | None:
        """Pick a prefill and a decode replica (`policies.routing`), or None when no decode
        replica is up. No prefill replica means the decode replica prefills the prompt."""
        self.control.ensure_started()
        chosen = route(
            self._alive(Role.PREFILL),
            self._alive(Role.DECODE),
            num_prompt_tokens,
            self.pd_mode,
            self.sessions.get(session_id) if session_id else None,
        )
        if chosen is None:
            return None
        decode, prefill = chosen.decode_replica, chosen.prefill_replica
        if session_id:
            self.sessions.pop(session_id, None)
            self.sessions[session_id] = decode
            if len(self.sessions) > MAX_SESSIONS:
                self.sessions.pop(next(iter(self.sessions)))
        self.metrics.decision(chosen.prefill_reason)
        self.metrics.decision(f"decode_{chosen.decode_reason}")
        decode_state = self.replicas[Role.DECODE][decode]
        # Prefill and decode replicas share a CPU node's cores; while decode has nothing to
        # do, the prefill may use all of them (2x shorter TTFT on 2 cores).
        decode_idle = decode_state.load == 0
        decode_state.num_assigned += 1
        if prefill is not None:
            self.replicas[Role.PREFILL][prefill].num_assigned += 1
        self.assignments[req_id] = (prefill, decode)
        self.num_routed += 1
        return RoutePlan(
            req_id=req_id,
            prefill_replica=prefill,
            decode_replica=decode,
            prefill_threads=self.node_cpus if prefill is not None and decode_idle else None,
        )

    async def reroute(
        self, req_id: str, session_id: str | None, lost_replica: str | None
    ) -> RoutePlan | None:
        """A decode replica for a request to resume on, as its decode replica died
        (`lost_replica`, never chosen) or refused it (None: any); None while none is up
        (Serve is restarting it). The replica prefills the prompt and the tokens already
        generated itself: no prefill replica is involved."""
        if lost_replica is not None:
            await self.forget(lost_replica)  # the caller saw it die; its report may be fresh
        alive = self._alive(Role.DECODE)
        chosen = choose_decode(alive, None)
        if chosen is None:
            return None
        decode = chosen[0]
        await self.prefill_done(req_id)
        _, before = self.assignments.pop(req_id, (None, ""))
        if before in self.replicas[Role.DECODE]:
            self.replicas[Role.DECODE][before].num_assigned -= 1
        alive[decode].num_assigned += 1
        self.assignments[req_id] = (None, decode)
        if session_id:  # the conversation's KV is on the new replica from now on
            self.sessions.pop(session_id, None)
            self.sessions[session_id] = decode
        self.metrics.decision("decode_failover")
        return RoutePlan(req_id=req_id, prefill_replica=None, decode_replica=decode)

    async def set_pd_mode(self, mode: str) -> None:
        """Switch between disaggregated, colocated and auto routing without a restart."""
        await self.set_policy({"pd_mode": mode})

    async def set_policy(self, changes: dict) -> RuntimePolicy:
        """Apply a validated change (raises on a bad one, changing nothing)."""
        before = self.policy.kv_profile
        self.policy = self.policy.updated(changes)
        logger.info("policy changed: %s -> %s", changes, self.policy.model_dump())
        self.publish_quality_estimate()
        if self.policy.kv_profile != before:
            self._push_kv_profile()
        return self.policy

    def _push_kv_profile(self) -> None:
        """The store demotes by the current profile; the scheduler pushes it down (the
        store never asks: calls flow one way). A store restarting starts on the configured
        profile."""
        self._push_to_store("set_profile", self.policy.kv_profile)

    def _push_to_store(self, method: str, *args: object) -> None:
        """Fire-and-forget `kv_store.<method>(*args)`."""
        if not ray.is_initialized():  # a plain object in unit tests: don't start Ray
            return
        try:
            getattr(kv_store_actor(self.config_dict), method).remote(*args)
        except Exception:  # the store restarting: it starts empty, on the configured profile
            logger.warning("could not call kv_store.%s", method, exc_info=True)

    def publish_quality_estimate(self) -> None:
        """The active profile's measured ΔPPL, as `inferos:kv_delta_ppl_estimate` (relative,
        0.01 = +1 %) on the store, which exports the other KV-level metrics."""
        estimate = PROFILE_DELTA_PPL_PCT.get(self.policy.kv_profile, 0.0) / 100
        self._push_to_store("set_delta_ppl_estimate", estimate)

    async def get_policy(self) -> RuntimePolicy:
        return self.policy

    async def set_run_context(self, context: dict) -> RunContext:
        """Validate and store the operator's expectations (raises on bad input, keeping the
        previous context); nothing acts on them yet."""
        version = self.run_context.version + 1 if self.run_context else 1
        if "version" in context:
            raise ValueError("version is set by the scheduler, not by callers")
        ctx = RunContext.model_validate({**context, "version": version})
        self.run_context = ctx.check_fits(self.max_model_len)
        logger.info("run context set: %s", self.run_context.model_dump())
        return self.run_context

    async def get_run_context(self) -> RunContext | None:
        return self.run_context

    async def prefill_done(self, req_id: str) -> None:
        prefill, decode = self.assignments.get(req_id, (None, ""))
        if prefill is not None and prefill in self.replicas[Role.PREFILL]:
            self.replicas[Role.PREFILL][prefill].num_assigned -= 1
            self.assignments[req_id] = (None, decode)

    async def finished(self, req_id: str, error: bool = False) -> None:
        """`error`: the request failed by the server's fault, which counts toward the
        error-rate fallback; the ingress never reports a client's 4xx or a timeout as one
        (`serving.api.errors.is_server_fault`), and refuses most 4xx before routing."""
        self.control.record_outcome(error)
        await self.prefill_done(req_id)
        _, decode = self.assignments.pop(req_id, (None, ""))
        if decode in self.replicas[Role.DECODE]:
            self.replicas[Role.DECODE][decode].num_assigned -= 1

    async def forget(self, replica_id: str) -> None:
        """A caller saw this replica die: stop routing to it until it reports again, and
        have the store forget the KV it put (its objects died with it)."""
        if any(replica_id in pool for pool in self.replicas.values()):
            self.control.replica_lost(replica_id)
            self._push_to_store("drop_producer", replica_id)
        for pool in self.replicas.values():
            pool.pop(replica_id, None)
        self.metrics_texts_by_replica.pop(replica_id, None)

    async def readiness(self) -> dict:
        """What /health (ingress) and /v1/health (control API) answer from, and no more (a
        snapshot copies up to 1000 sessions): `ready` once a decode replica is up and, if
        the config starts prefill replicas, one of those too (the app is fully up)."""
        counts = {role.value: len(pool) for role, pool in self.replicas.items()}
        ready = counts["decode"] > 0 and (counts["prefill"] > 0 or not self.has_prefill_replicas)
        return {
            "ready": ready,
            "replicas": counts,
            "pd_mode": self.pd_mode,
            "in_flight": len(self.assignments),
        }

    async def snapshot(self) -> dict:
        return {
            role.value: {rid: _state_dict(s) for rid, s in pool.items()}
            for role, pool in self.replicas.items()
        } | {
            "num_routed": self.num_routed,
            "in_flight": len(self.assignments),
            "pd_mode": self.pd_mode,
            "sessions": dict(list(self.sessions.items())[-1000:]),
            "assignments": {r: d for r, (_, d) in list(self.assignments.items())[-1000:]},
            "control": self.control.snapshot(),
        }

    async def push_metrics_text(self, replica_id: str, text: str) -> None:
        """An ingress replica's own metrics (engine replicas send theirs with `report`), so
        /metrics on any one ingress replica shows all of them when there are several."""
        self.ingress_texts[replica_id] = (time.time(), text)

    async def metrics_texts(self, exclude: str | None = None) -> list[str]:
        """Every replica's last metrics text; `exclude`: the asking ingress replica, which
        adds its own fresh text instead of its pushed copy."""
        live = {rid for pool in self.replicas.values() for rid in pool}
        texts = [t for rid, t in self.metrics_texts_by_replica.items() if rid in live]
        now = time.time()
        texts += [
            t
            for rid, (at, t) in self.ingress_texts.items()
            if rid != exclude and now - at < STALE_AFTER_S
        ]
        return [*texts, self.metrics.exposition()]


def _state_dict(s: ReplicaState) -> dict:
    return {
        "num_running": s.num_running,
        "num_waiting": s.num_waiting,
        "num_assigned": s.num_assigned,
        "kv_usage": s.kv_usage,
        "step_time_s": s.step_time_s,
        "last_report_s": s.last_report_s,
    }


def scheduler_actor(config: dict) -> ray.actor.ActorHandle:
    """The app's scheduler (created by whichever process asks first)."""
    return get_or_create(SchedulerActor, SCHEDULER_NAME, config)
