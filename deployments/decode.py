"""Decode deployment: imports a prompt's KV from the store, generates with continuous
batching, and streams every engine step's new tokens to each ingress in one message."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from dataclasses import replace

from ray import serve
from ray.exceptions import RayError

from deployments.engine_replica import EngineReplica
from deployments.stream_interval import stream_interval
from deployments.subscribers import CHECK_PERIOD_S, subscriber_alive
from policies.runtime import RuntimePolicy
from serving.engine.engine import LLMEngine, StepOutput
from serving.engine.logprobs import TokenLogprobs
from serving.engine.sequence import Sequence
from serving.messages import DecodeRequest, ReplicaLoad, Role, TokenDelta
from serving.spec.decode_step import SpecDecodeStep
from serving.spec.replica import SpecMetricsPusher, attach_speculation

logger = logging.getLogger(__name__)


class DecodeServer(EngineReplica):
    role = Role.DECODE

    async def __init__(self, config: dict, draft=None):
        self._draft = draft  # handle of the `draft` deployment (speculation placement)
        self.spec: SpecDecodeStep | None = None
        self._spec_metrics = SpecMetricsPusher()
        self._queues: dict[str, asyncio.Queue[list[TokenDelta]]] = {}
        self._subscriber_of: dict[str, str] = {}  # req_id → ingress replica id
        self._open_streams: dict[str, int] = {}  # ingress replica id → its open streams
        self._held: dict[str, list[int]] = {}  # tokens not streamed yet (stream_interval)
        self._held_logprobs: dict[str, list[TokenLogprobs]] = {}  # theirs, where asked for
        self._streamed: set[str] = set()  # requests whose first token went out
        self.num_local_prefills = 0
        self._storing: dict[str, Sequence] = {}  # local prefills whose turn goes to the store
        self._store_tasks: set[asyncio.Task] = set()
        await self._start_engine(config)
        self.stream_interval = self.config.scheduling.stream_interval
        self.num_imported = 0
        self.num_resumed = 0  # streams resumed here after their decode replica died
        self._watch_task = asyncio.create_task(self._watch_subscribers())

    async def _watch_subscribers(self) -> None:
        """Abort the requests of an ingress replica that has died (`deployments/subscribers`)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(CHECK_PERIOD_S)
            for subscriber in set(self._subscriber_of.values()):
                try:
                    alive = await loop.run_in_executor(None, subscriber_alive, subscriber)
                except Exception:  # the GCS unreachable for a moment: ask again later
                    logger.warning("liveness of %s unknown", subscriber, exc_info=True)
                    continue
                if not alive:
                    self._drop_subscriber(subscriber)

    def _build_engine(self, path) -> LLMEngine:
        """Runs on the engine thread: the target engine, then its speculative step."""
        engine = super()._build_engine(path)
        # the draft reads the torch runner's model and KV pool: no speculation elsewhere
        if self.backend_info.name == "torch":
            self.spec = attach_speculation(engine, self.config, path, self._draft)
        return engine

    def _apply_policy(self, policy: RuntimePolicy) -> None:
        super()._apply_policy(policy)
        if self.spec is not None:
            self.spec.enabled = policy.speculation

    def _load(self, with_metrics: bool) -> ReplicaLoad:
        if self.spec is not None:
            self._spec_metrics.push(self.spec, self.metrics)
        return super()._load(with_metrics)

    def _queue(self, subscriber_id: str) -> asyncio.Queue[list[TokenDelta]]:
        return self._queues.setdefault(subscriber_id, asyncio.Queue())

    def _on_outputs(self, outputs: list[StepOutput]) -> None:
        """Route each step's tokens to their ingress; with a stream interval N > 1 a
        request's tokens are held until N have gathered (or it finished), as vLLM's
        --stream-interval does, so the hops behind us pay per N tokens, not per token."""
        interval = stream_interval(self.stream_interval, len(outputs))
        by_subscriber: dict[str, list[TokenDelta]] = {}
        for out in outputs:
            storing = out.finished and out.req_id in self._storing
            subscriber = self._subscriber_of.get(out.req_id)
            if subscriber is None:  # aborted meanwhile
                self._storing.pop(out.req_id, None)
                continue
            held = self._held.setdefault(out.req_id, [])
            held.extend(out.new_token_ids)
            if out.logprobs is not None:
                self._held_logprobs.setdefault(out.req_id, []).extend(out.logprobs)
            # a request's first token always goes out at once: it is the TTFT
            first = out.req_id not in self._streamed
            if not (first or out.finished or len(held) >= interval):
                continue
            self._streamed.add(out.req_id)
            del self._held[out.req_id]
            if out.finished:
                del self._subscriber_of[out.req_id]
                self._streamed.discard(out.req_id)
            delta = TokenDelta(out.req_id, held, out.finished, out.finish_reason, out.error)
            delta = self._with_logprobs(delta, out)
            if storing:  # the turn ends for the client once its KV is in the store
                if delta.token_ids and delta.error is None:
                    # its tokens go out now: storing is nobody's TTFT (a one-token answer)
                    by_subscriber.setdefault(subscriber, []).append(
                        replace(delta, finished=False, finish_reason=None)
                    )
                    delta = TokenDelta(out.req_id, [], True, out.finish_reason)
                self._store_turn(out, subscriber, delta)
                continue
            by_subscriber.setdefault(subscriber, []).append(delta)
        for subscriber, deltas in by_subscriber.items():
            self._queue(subscriber).put_nowait(deltas)

    def _with_logprobs(self, delta: TokenDelta, out: StepOutput) -> TokenDelta:
        """`delta` with the logprobs of its tokens (held with them) and, on a request's
        first, of its prompt, where the request asked for them."""
        logprobs = self._held_logprobs.pop(out.req_id, None)
        if logprobs is None and out.prompt_logprobs is None:
            return delta
        return replace(delta, logprobs=logprobs, prompt_logprobs=out.prompt_logprobs)

    async def submit(self, req: DecodeRequest, replica_id: str | None = None) -> str | None:
        """Start decoding `req`; returns an error message instead of raising."""
        if replica_id is not None and replica_id != self.replica_id:
            return f"request for decode replica {replica_id} reached {self.replica_id}"
        seq = Sequence(req.req_id, list(req.prompt_token_ids), req.params)
        seq.prompt_group, seq.group_size = req.prompt_group, req.group_size
        if req.resume_token_ids:  # its decode replica died: go on after what was streamed
            seq.output_token_ids = list(req.resume_token_ids)
            # the stored prompt KV (a prefill replica's, an earlier turn's) as a prefix
            seq.kv_import = await self._cached_prefix(seq.token_ids(0, seq.num_tokens))
            if req.store_turn and self.config.kv_cache.prefix_reuse:
                seq.export_kv_at_finish = True
                self._storing[req.req_id] = seq
            self.num_resumed += 1
            self._streamed.add(req.req_id)  # the client has its first token
        elif req.kv_key is not None and req.first_token_id is not None:
            stored = await self.kv_store.get.remote(req.kv_key, self.replica_id)
            if stored is None:
                return f"KV {req.kv_key} is not in the kv_store"
            try:
                seq.kv_import = await self._read_stored(stored)
            except RayError as e:  # the prefill replica died since: the ingress resumes
                return f"KV {req.kv_key} is unreadable: {type(e).__name__}"
            seq.output_token_ids = [req.first_token_id]
            self.num_imported += 1
            self._streamed.add(req.req_id)  # the ingress has the first token already
        else:
            self.num_local_prefills += 1
            if self.config.kv_cache.prefix_reuse:
                # an earlier turn (its answer included) or a shared system prompt is stored:
                # compute only the rest, and store a chat turn for the next one
                seq.kv_import = await self._cached_prefix(seq.prompt_token_ids)
                if req.store_turn:
                    seq.export_kv_at_finish = True
                    self._storing[req.req_id] = seq
        error = await self._constrain(seq)  # after the tokens it has: they are replayed
        if error is not None:
            self._storing.pop(req.req_id, None)
            self._streamed.discard(req.req_id)
            return error
        self._subscriber_of[req.req_id] = req.subscriber_id
        self.thread.add(seq)
        return None

    def _store_turn(self, out: StepOutput, subscriber: str, last: TokenDelta) -> None:
        """A finished chat turn this replica prefilled: its KV (prompt and answer) into the
        store, indexed by its tokens, so the next turn finds it as a prefix; then the turn's
        last delta. In that order: a client sends the next turn as soon as this one ends,
        and must find it stored. Off the engine thread; the other requests go on."""
        seq = self._storing.pop(out.req_id)
        queue = self._queue(subscriber)

        async def store_then_finish() -> None:
            try:
                if out.kv_export is not None and out.finish_reason in ("stop", "length"):
                    exported = out.kv_export
                    token_ids = seq.token_ids(0, exported.num_tokens)
                    await self._store(f"turn-{out.req_id}", exported, token_ids)
            except Exception:  # a lost store is a later cache miss, never a failed turn
                logger.warning("storing turn %s failed", out.req_id, exc_info=True)
            finally:
                queue.put_nowait([last])

        task = asyncio.get_running_loop().create_task(store_then_finish())
        self._store_tasks.add(task)  # keep a reference until done
        task.add_done_callback(self._store_tasks.discard)

    async def abort(self, req_id: str, replica_id: str | None = None) -> None:
        self._storing.pop(req_id, None)
        self._subscriber_of.pop(req_id, None)
        self._held.pop(req_id, None)
        self._held_logprobs.pop(req_id, None)
        self._streamed.discard(req_id)
        self.thread.abort(req_id)

    async def stream(
        self, subscriber_id: str, replica_id: str | None = None
    ) -> AsyncGenerator[list[TokenDelta], None]:
        """One long-lived stream per ingress replica: each item is every delta of one or
        more engine steps, so the per-item cost is paid per step, not per token."""
        queue = self._queue(subscriber_id)
        self._open_streams[subscriber_id] = self._open_streams.get(subscriber_id, 0) + 1
        try:
            yield []  # tells the caller the stream is attached
            while True:
                batch = await queue.get()
                while not queue.empty():
                    batch.extend(queue.get_nowait())
                yield batch
        finally:  # the ingress replica went away (died, or was stopped): nobody reads these
            self._open_streams[subscriber_id] -= 1
            if not self._open_streams[subscriber_id]:  # not if it has opened another since
                del self._open_streams[subscriber_id]
                self._drop_subscriber(subscriber_id)

    def _drop_subscriber(self, subscriber_id: str) -> None:
        """Abort the requests streaming to `subscriber_id` instead of decoding them to
        max_tokens for nobody."""
        orphans = [r for r, s in self._subscriber_of.items() if s == subscriber_id]
        if orphans:
            logger.warning(
                "ingress %s is gone: aborting its %d requests", subscriber_id, len(orphans)
            )
        for req_id in orphans:
            self._storing.pop(req_id, None)
            self._subscriber_of.pop(req_id, None)
            self._held.pop(req_id, None)
            self._held_logprobs.pop(req_id, None)
            self._streamed.discard(req_id)
            self.thread.abort(req_id)
        self._queues.pop(subscriber_id, None)

    async def stats(self) -> dict:
        return await super().stats() | {
            "num_imported": self.num_imported,
            "num_local_prefills": self.num_local_prefills,
            "num_resumed": self.num_resumed,
            "num_reused_tokens": self.num_reused_tokens,
            "spec_decode": self.spec.snapshot() if self.spec is not None else None,
        }


DecodeDeployment = serve.deployment(DecodeServer, name="decode")
