"""One request's way through the replicas: route -> prefill -> decode -> clean-up.

The call sequence, for each choice of a request (n > 1: one request per choice, `start`):

1. `scheduler.route(req_id, prompt length, session)` -> a `RoutePlan` (None: 503, no decode
   replica is up). The choices of one request share a session key, so they land on one
   engine, which computes their prompt once.
2. With a prefill replica in the plan: `prefill.prefill(PrefillRequest)` -> the first token
   and the prompt's KV in the kv_store (`kv_key`); then `scheduler.prefill_done`. A dead
   prefill replica is forgotten and the decode replica prefills instead.
3. `ResumableStream`: the decode stream is opened on the mux BEFORE `decode.submit`, so
   no token the engine emits between the two is lost; tokens then arrive per engine step,
   in chunks. A decode replica dying under the stream is resumed on another.
4. Clean-up, always, from a task outside the request's context (a client disconnect
   cancels the request, and would cancel these calls with it): `scheduler.finished`;
   for a request that ended early `decode.abort` and, when its KV waits in the store,
   `kv_store.drop`.

The first token of every choice is awaited in `start`, so a routing or prefill error is
the HTTP status of the answer, not an event inside a stream that already said 200.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle

from deployments.decode_mux import DecodeMux
from deployments.resumable_stream import ResumableStream
from serving.api.errors import RequestTimeout, Unavailable, is_server_fault
from serving.api.prepare import Prepared, choices
from serving.config import InferosConfig
from serving.messages import DecodeRequest, PrefillRequest, PrefillResult, RoutePlan, TokenDelta
from serving.metrics import FrontendMetrics

logger = logging.getLogger(__name__)

# a started choice: its request, first token and the rest of its token stream
ChoiceRun = tuple[Prepared, TokenDelta, AsyncIterator[TokenDelta]]


class RequestFlow:
    def __init__(
        self,
        config: InferosConfig,
        scheduler,  # the scheduler actor's handle
        kv_store,  # the kv_store actor's handle
        prefill: DeploymentHandle | None,
        decode: DeploymentHandle,
        mux: DecodeMux,
        subscriber_id: str,
        metrics: FrontendMetrics,
        on_done: Callable[[], None],  # a choice is over (the ingress counts it out)
    ):
        self.config = config
        self.scheduler = scheduler
        self.kv_store = kv_store
        self.prefill = prefill
        self.decode = decode
        self.mux = mux
        self.subscriber_id = subscriber_id
        self.metrics = metrics
        self.on_done = on_done
        self._cleanups: set[asyncio.Task] = set()

    async def start(self, p: Prepared, started: float) -> list[ChoiceRun]:
        """Start every choice (n > 1: on one decode replica, which computes the prompt once)
        and wait for each one's first token: routing and prefill errors surface here, as
        the HTTP status, with every choice that did start aborted."""
        each = choices(p)
        if len(each) > 1:  # one route for all: the prompt's KV is shared on one engine
            for choice in each:
                choice.session_id = p.session_id or p.req_id
        streams = [self._generate(choice, started) for choice in each]
        firsts = await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
        failure = next((f for f in firsts if isinstance(f, BaseException)), None)
        if failure is not None:
            for stream in streams:
                await stream.aclose()
            raise failure
        return list(zip(each, firsts, streams, strict=True))  # type: ignore[arg-type]

    async def _generate(self, p: Prepared, started: float) -> AsyncIterator[TokenDelta]:
        """Routes, prefills and decodes one request; yields its token deltas. A decode
        replica dying under the request does not end it: `ResumableStream` resumes it on
        another (or the restarted) replica."""
        plan: RoutePlan | None = None
        stream: ResumableStream | None = None
        deltas: AsyncIterator[TokenDelta] | None = None
        finished = False
        kv_key = None
        failed = False  # a server-side failure: counts against the error rate (fallback)
        try:
            plan = await self.scheduler.route.remote(p.req_id, len(p.prompt_ids), p.session_id)
            if plan is None:
                raise Unavailable("no decode replica is ready yet; retry shortly")
            deadline = started + (self.config.scheduling.request_timeout_s or float("inf"))
            first: TokenDelta | None = None
            if plan.prefill_replica is not None:
                try:
                    first, kv_key = await self._within(
                        self._prefill(p, plan.prefill_replica, plan.prefill_threads), deadline
                    )
                except RayError:  # the prefill replica died: the decode replica prefills
                    logger.warning("prefill replica %s failed", plan.prefill_replica)
                    self.scheduler.forget.remote(plan.prefill_replica)
                if first is not None and first.finished:
                    finished = True
                    yield first
                    return
            stream = self._decode_stream(p, plan, first, kv_key, deadline)
            deltas = aiter(stream)
            if first is None:  # the decode replica prefills: its first delta is the TTFT
                first = await anext(deltas)
                if first.error is not None:
                    raise Unavailable(f"decode failed: {first.error}")
            self.metrics.ttft.observe(time.perf_counter() - started)
            finished = first.finished
            yield first
            async for delta in deltas:
                finished = delta.finished
                failed = failed or delta.error is not None
                yield delta
        except RayError as e:  # a replica or actor died under the request
            failed = True
            raise Unavailable("a replica failed while serving the request; retry") from e
        except Exception as e:  # a timeout is load and a 4xx the client's: neither counts
            failed = failed or is_server_fault(e)
            raise
        finally:
            if deltas is not None:
                await deltas.aclose()
            self.on_done()
            self.mux.close(p.req_id)
            if plan is not None:
                decode_replica = stream.replica if stream is not None else plan.decode_replica
                self._clean_up(p.req_id, decode_replica, kv_key, not finished, failed)

    def _decode_stream(
        self,
        p: Prepared,
        plan: RoutePlan,
        first: TokenDelta | None,
        kv_key: str | None,
        deadline: float,
    ) -> ResumableStream:
        """Decode after the prefill replica's `first` token and KV, or (both None) decode
        with the decode replica prefilling."""
        request = DecodeRequest(
            p.req_id,
            p.prompt_ids,
            first.token_ids[0] if first is not None else None,
            p.params,
            kv_key,
            self.subscriber_id,
            store_turn=hasattr(p.request, "messages"),
            prompt_group=p.prompt_group,
            group_size=p.n,
        )
        scheduling = self.config.scheduling
        return ResumableStream(
            request,
            plan.decode_replica,
            self.mux,
            self.decode,
            self.scheduler,
            lambda awaitable: self._within(awaitable, deadline),
            p.session_id,
            scheduling.failover_wait_s,
            scheduling.failover_max_resumes,
            self.metrics.stream_resumes.inc,
        )

    async def _within(self, awaitable, deadline: float):
        """`await awaitable`, or a clean 503 `request_timeout` once `deadline` has passed."""
        remaining = deadline - time.perf_counter()
        try:
            return await asyncio.wait_for(awaitable, max(remaining, 0.001))
        except TimeoutError:
            raise RequestTimeout(
                f"request timed out after {self.config.scheduling.request_timeout_s:g} s "
                "(scheduling.request_timeout_s); it was aborted"
            ) from None

    def _clean_up(
        self, req_id: str, decode_replica: str, kv_key: str | None, aborted: bool, failed: bool
    ) -> None:
        """Tell the scheduler (and, for a request that ended early, decode and the store).

        The calls go out from a task outside the request's context: made from the request
        itself while a client disconnect cancels it, Serve cancels them too (recursive
        cancellation) and the decode replica would go on generating for nobody."""
        if aborted:  # client went away, a stop string matched, or an error
            logger.info("request %s ended early: aborting it on decode", req_id)

        async def send() -> None:
            self.scheduler.finished.remote(req_id, failed)
            if aborted:
                await self.decode.abort.remote(req_id, replica_id=decode_replica)
                if kv_key is not None:  # nobody will resume it: free the blocks now
                    await self.kv_store.drop.remote(kv_key)

        task = asyncio.get_running_loop().create_task(send(), context=contextvars.Context())
        self._cleanups.add(task)  # keep a reference until done
        task.add_done_callback(self._cleanups.discard)

    async def _prefill(
        self, p: Prepared, replica_id: str, num_threads: int | None
    ) -> tuple[TokenDelta, str | None]:
        result = await self.prefill.prefill.remote(
            PrefillRequest(p.req_id, p.prompt_ids, p.params, num_threads), replica_id=replica_id
        )
        self.scheduler.prefill_done.remote(p.req_id)
        if result.error is not None:
            raise Unavailable(f"prefill failed: {result.error}")
        first = TokenDelta(p.req_id, [result.first_token_id], result.finished, result.finish_reason)
        first = self._with_prefill_logprobs(first, result)
        return first, result.kv_key

    @staticmethod
    def _with_prefill_logprobs(first: TokenDelta, result: PrefillResult) -> TokenDelta:
        if result.logprobs is None and result.prompt_logprobs is None:
            return first
        return replace(first, logprobs=result.logprobs, prompt_logprobs=result.prompt_logprobs)
