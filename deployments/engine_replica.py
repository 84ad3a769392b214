"""What prefill and decode replicas share: model loading, the engine thread, metrics and
the periodic load report to the scheduler actor."""

from __future__ import annotations

import asyncio
import logging
import os

import ray
import torch
from ray import serve
from ray.exceptions import RayError

from deployments.kv_store import kv_store_actor
from deployments.loopback import keep_replica_grpc_on_loopback
from deployments.scheduler import scheduler_actor
from policies.runtime import RuntimePolicy
from serving.backends.base import BackendContext
from serving.backends.registry import build_engine
from serving.config import InferosConfig
from serving.engine.engine import LLMEngine, StepOutput, StepStats
from serving.engine.engine_thread import EngineThread
from serving.engine.sequence import Sequence
from serving.kv.block_format import KVPayload
from serving.logging_setup import configure_logging
from serving.memory import MemoryAccount, model_of, return_freed_heap, summary_line
from serving.messages import ReplicaLoad, Role
from serving.metrics import EngineMetrics
from serving.models.hf_folder import resolve_model_path, served_model_name
from serving.models.int4 import HybridInt4Linear
from serving.structured.engine_grammar import LazyEngineGrammar, grammar_for_model
from serving.structured.request import InvalidStructuredOutput

logger = logging.getLogger(__name__)

# Every wake-up of another process on a small box stalls the engine's OpenMP team, so
# reports are sparse: routing also counts what it sent each replica since the last report.
REPORT_PERIOD_S = 0.5
METRICS_EVERY_N_REPORTS = 2
STEP_TIME_EWMA = 0.2


class EngineReplica:
    role: Role

    async def _start_engine(self, config: dict) -> None:
        configure_logging()
        keep_replica_grpc_on_loopback()
        self.config = InferosConfig.model_validate(config)
        threads = self.config.threads_for(self.role.value, os.cpu_count() or 1)
        torch.set_num_threads(threads)
        self.default_threads = threads
        path = resolve_model_path(self.config.model.path)
        self.model_name = self.config.model.served_model_name or served_model_name(path)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.metrics = EngineMetrics(self.model_name, self.role.value, self.replica_id)
        self.metrics.kv_blocks_total.set(self.config.kv_cache.num_blocks)
        self.step_time_s = 0.0
        self.scheduler = scheduler_actor(config)
        self.kv_store = kv_store_actor(config)
        self.thread = EngineThread(
            lambda: self._build_engine(path),
            asyncio.get_running_loop(),
            self._on_outputs,
            self._on_step,
        )
        self.engine = await self.thread.wait_ready()
        return_freed_heap()  # what casting/quantizing at load freed, back to the OS
        pool = self.engine.block_pool
        self.memory = MemoryAccount.after_load(
            model_of(self.engine), pool.num_blocks * pool.block_bytes
        )
        sample = self.memory.sample(self.engine.block_pool.used_bytes)
        self.metrics.memory(sample)
        logger.info("%s", summary_line(self.role.value, self.replica_id, sample))
        # structured output: the grammar engine reads the vocabulary on first use only
        structured = self.config.structured_outputs
        self.grammar = LazyEngineGrammar(
            lambda: grammar_for_model(
                path, self.engine.eos_token_ids, structured.backend, structured.any_whitespace
            )
        )
        self._report_task = asyncio.create_task(self._report_loop())
        logger.info(
            "%s replica %s ready (pid %d, %d torch threads)",
            self.role.value,
            self.replica_id,
            os.getpid(),
            threads,
        )

    def _build_engine(self, path) -> LLMEngine:
        """Runs on the engine thread; the role's `backend` setting picks the engine."""
        backend = getattr(self.config, self.role.value).backend
        ctx = BackendContext(self.config, self.role, path, self.default_threads)
        engine, self.backend_info = build_engine(backend, ctx)
        self.metrics.execution_provider(self.backend_info.metric_label)
        return engine

    def _on_step(self, stats: StepStats) -> None:
        """Engine thread: per-step metrics (prometheus_client is thread-safe)."""
        self.metrics.iteration_tokens.observe(stats.num_tokens)
        self.metrics.batch_size.observe(stats.num_seqs)
        self.metrics.step_seconds.observe(stats.duration_s)
        self.step_time_s += STEP_TIME_EWMA * (stats.duration_s - self.step_time_s)

    def _on_outputs(self, outputs: list[StepOutput]) -> None:
        raise NotImplementedError

    def _load(self, with_metrics: bool) -> ReplicaLoad:
        engine = self.engine
        self.metrics.running.set(engine.num_running)
        self.metrics.waiting.set(engine.num_waiting)
        self.metrics.kv_usage.set(engine.kv_usage)
        self.metrics.kv_blocks_used.set(engine.block_pool.num_used_blocks)
        if with_metrics:  # RSS and rusage reads: only when the metrics text is sent
            self.metrics.memory(self.memory.sample(engine.block_pool.used_bytes))
        self.metrics.preemptions.inc(engine.num_preemptions - self._preemptions_reported)
        self._preemptions_reported = engine.num_preemptions
        self._export_prefix_cache(engine)
        self._export_kv_levels(engine)
        return ReplicaLoad(
            role=self.role,
            replica_id=self.replica_id,
            num_running=engine.num_running,
            num_waiting=engine.num_waiting,
            kv_usage=engine.kv_usage,
            step_time_s=self.step_time_s,
            metrics_text=self.metrics.exposition() if with_metrics else "",
        )

    _preemptions_reported = 0
    _levels_reported = (0, 0, 0)
    _prefix_cache_reported = (0, 0)

    def _export_prefix_cache(self, engine: LLMEngine) -> None:
        cache = engine.prefix_cache
        if cache is None:
            return
        queried, hit = cache.num_queried_tokens, cache.num_hit_tokens
        self.metrics.prefix_cache_queries.inc(queried - self._prefix_cache_reported[0])
        self.metrics.prefix_cache_hits.inc(hit - self._prefix_cache_reported[1])
        self._prefix_cache_reported = (queried, hit)

    def _export_kv_levels(self, engine: LLMEngine) -> None:
        """Blocks/bytes per level and the move counters (in blocks, as the store counts)."""
        staged = engine.staged
        for level, n in staged.blocks_per_level().items():
            self.metrics.blocks_per_level[level].set(n)
        for level, n in staged.bytes_per_level().items():
            self.metrics.bytes_per_level[level].set(n)
        c = staged.counters
        now = (c.demotions * staged.ub, c.promotions * staged.ub, c.spills * staged.ub)
        before = self._levels_reported
        self.metrics.demotions.inc(now[0] - before[0])
        self.metrics.promotions.inc(now[1] - before[1])
        self.metrics.spills.inc(now[2] - before[2])
        self._levels_reported = now

    policy_version = -1
    num_reused_tokens = 0  # prompt tokens whose KV came from the store (prefix reuse)

    async def _read_stored(self, stored: KVPayload) -> KVPayload:
        """A payload of the kv_store's object refs, read (zero-copy on the same node)."""
        blocks = await asyncio.gather(*stored.blocks)
        self.metrics.kv_transfer_bytes.inc(stored.num_bytes)
        return KVPayload(stored.layout, stored.num_tokens, list(blocks), stored.spans, stored.sizes)

    async def _store(self, key: str, exported: KVPayload, token_ids: list[int]) -> KVPayload:
        """Put an engine's exported KV into the object store and register it with the
        kv_store under `key`, indexed by `token_ids` for prefix reuse; returns the payload
        of object refs."""
        # off the event loop: serialising a long turn's blocks takes ~100 ms, which would
        # hold up every stream's tokens (the turn's own first token included)
        refs = await asyncio.get_running_loop().run_in_executor(
            None, lambda: [ray.put(b) for b in exported.blocks]
        )
        payload = KVPayload(
            exported.layout, exported.num_tokens, refs, exported.spans, exported.sizes
        )
        self.metrics.kv_transfer_bytes.inc(payload.num_bytes)
        try:
            await self.kv_store.put.remote(key, payload, self.replica_id, token_ids)
        except RayError as e:  # the store is restarting: later prompts miss this prefix
            logger.warning("kv_store unavailable, KV of %s not stored: %s", key, type(e).__name__)
        return payload

    async def _cached_prefix(self, prompt_token_ids: list[int]) -> KVPayload | None:
        """The stored KV of this prompt's longest cached prefix (an earlier turn of the
        conversation, a shared system prompt), so the engine computes only the rest."""
        if not self.config.kv_cache.prefix_reuse:
            return None
        block_size = self.config.kv_cache.block_size
        local = self._locally_cached_tokens(prompt_token_ids)
        if local >= (len(prompt_token_ids) - 1) // block_size * block_size:
            return None  # the engine's pool holds all the store could give
        try:
            stored = await self.kv_store.match_prefix.remote(
                list(prompt_token_ids), block_size, self.replica_id, local
            )
        except RayError as e:  # the store is restarting: a lost store is a cache miss
            logger.warning("kv_store unavailable, prefix not looked up: %s", type(e).__name__)
            return None
        if stored is None:  # or no longer than what the engine's own prefix cache holds
            return None
        try:
            payload = await self._read_stored(stored)
        except RayError as e:  # its producer died meanwhile (the store is told): a miss
            logger.warning("stored prefix unreadable, computing it: %s", type(e).__name__)
            return None
        self.num_reused_tokens += stored.num_tokens
        return payload

    def _locally_cached_tokens(self, token_ids: list[int]) -> int:
        """Leading tokens whose KV the engine's prefix cache holds now (a hint read from
        this thread: the engine matches again when it admits the sequence)."""
        cache = self.engine.prefix_cache
        return cache.peek_num_tokens(list(token_ids[:-1])) if cache is not None else 0

    async def _constrain(self, seq: Sequence) -> str | None:
        """Give a structured-output sequence its grammar state, replaying the tokens it
        already has (compiled off the event loop and off the engine thread, so a slow
        schema holds up no step); an error message, not a raise, when the engine refuses
        it: the request fails alone."""
        spec = seq.params.structured
        if spec is None:
            return None
        if self.backend_info.name == "vllm":  # its runner samples inside vLLM
            return "structured output is not supported by the vllm prefill backend"
        loop = asyncio.get_running_loop()
        try:
            seq.grammar = await loop.run_in_executor(
                None, lambda: self.grammar.get().state_for(spec, seq.output_token_ids)
            )
        except InvalidStructuredOutput as e:
            return f"structured output refused: {e}"
        return None

    def _apply_policy(self, policy: RuntimePolicy) -> None:
        """A new run-time policy arrived with a report answer; roles extend what they use."""
        profile, window = policy.kv_profile, policy.kv_window
        self.thread.call(lambda engine: engine.set_kv_policy(profile, window))
        limit = policy.max_num_seqs or self.config.scheduling.max_num_seqs
        self.thread.call(lambda engine: setattr(engine.scheduler, "max_num_seqs", limit))
        logger.info("KV profile now %s (window %s)", profile, window)

    async def _report_loop(self) -> None:
        n = 0
        while True:
            n += 1
            try:
                policy = await self.scheduler.report.remote(
                    self._load(n % METRICS_EVERY_N_REPORTS == 1)
                )
                if policy.version != self.policy_version:
                    self.policy_version = policy.version
                    self._apply_policy(policy)
            except Exception:  # the scheduler restarting must not kill the replica
                logger.warning("load report to the scheduler failed", exc_info=True)
            await asyncio.sleep(REPORT_PERIOD_S)

    async def stats(self) -> dict:
        """Engine counters for tests and the control API."""
        return {
            "replica_id": self.replica_id,
            "role": self.role.value,
            "num_running": self.engine.num_running,
            "num_waiting": self.engine.num_waiting,
            "kv_blocks_used": self.engine.block_pool.num_used_blocks,
            "kv_blocks_total": self.engine.config.num_blocks,
            "kv_blocks_shared": self.engine.scheduler.num_shared_prompt_blocks,  # n > 1
            "kv_blocks_cached": self.engine.block_pool.num_cached_blocks,
            "prefix_cache_hit_tokens": (
                self.engine.prefix_cache.num_hit_tokens if self.engine.prefix_cache else 0
            ),
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "kv_demotions": self.engine.staged.counters.demotions,
            "kv_units_imported": self.engine.staged.counters.imported,
            "int4_layers": sum(
                isinstance(m, HybridInt4Linear)
                for m in getattr(self.engine.runner, "model", torch.nn.Module()).modules()
            ),
            "backend": self.backend_info.name,
            "execution_provider": self.backend_info.device,
            "backend_note": self.backend_info.note,
        }

    def check_health(self) -> None:
        if not self.thread.is_alive():
            raise RuntimeError("engine thread died")
