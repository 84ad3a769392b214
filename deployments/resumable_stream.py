"""One request's decode stream, kept going when its decode replica dies.

    submit on the planned replica → relay its deltas
      ↳ the replica dies (the mux ends the stream with REPLICA_LOST), or refuses the request
        (it was not the target: Serve fell over to another; the prompt's KV left the store)
    → scheduler.reroute: another decode replica, or wait for Serve's restarted one
    → submit prompt + every token already relayed (`DecodeRequest.resume_token_ids`)
    → relay what follows them.

The new replica prefills prompt and relayed tokens itself, reusing whatever prefix of them
the KV store holds (the prompt's KV stored by a prefill replica, an earlier turn). Tokens the
dead replica generated but had not sent yet (`stream_interval`) are generated again: with
greedy or seeded sampling, the same ones (a seeded draw depends on the position, not the
replica), so the client sees the stream it would have seen without the failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.serve.handle import DeploymentHandle

from deployments.decode_mux import DecodeMux
from serving.api.errors import Unavailable
from serving.messages import REPLICA_LOST, DecodeRequest, TokenDelta

logger = logging.getLogger(__name__)

RETRY_PERIOD_S = 0.5  # between asking the scheduler for a decode replica while none is up


class ReplicaLost(Exception):
    """The decode replica serving the request died (`dead`) or could not take it."""

    def __init__(self, reason: str, dead: bool):
        super().__init__(reason)
        self.dead = dead


class ResumableStream:
    """Async-iterate it for the request's deltas; `replica` is the decode replica serving
    the request now (the one to abort it on)."""

    def __init__(
        self,
        request: DecodeRequest,
        replica: str,
        mux: DecodeMux,
        decode: DeploymentHandle,
        scheduler: Any,  # the scheduler actor's handle
        within: Callable[[Awaitable], Awaitable],  # the request's deadline
        session_id: str | None,
        wait_s: float,
        max_resumes: int,
        on_resume: Callable[[], None] = lambda: None,
    ):
        self.request = request
        self.replica = replica
        self._mux, self._decode, self._scheduler = mux, decode, scheduler
        self._within = within
        self._session_id = session_id
        self._wait_s, self._max_resumes = wait_s, max_resumes
        self._on_resume = on_resume
        self.num_resumes = 0
        first = request.first_token_id
        self._relayed: list[int] = [first] if first is not None else []

    async def __aiter__(self) -> AsyncIterator[TokenDelta]:
        while True:
            try:
                queue = await self._submit()
                while True:
                    delta = await self._within(queue.get())
                    if delta.finish_reason == REPLICA_LOST:
                        raise ReplicaLost(delta.error or "decode replica lost", dead=True)
                    self._relayed.extend(delta.token_ids)
                    yield delta
                    if delta.finished:
                        return
            except ReplicaLost as lost:
                await self._resume(str(lost), lost.dead)

    async def _submit(self) -> asyncio.Queue[TokenDelta]:
        queue = await self._mux.open(self.request.req_id, self.replica)
        try:
            error = await self._decode.submit.remote(self.request, replica_id=self.replica)
        except RayTaskError as e:  # raised inside a live replica: it refused, it is not dead
            # (checked first: a RayTaskError whose cause is another actor's RayActorError,
            # e.g. the kv_store restarting, is also an instance of RayActorError)
            raise ReplicaLost(f"decode could not start: {type(e).__name__}", dead=False) from e
        except RayActorError as e:
            reason = f"decode replica {self.replica} failed: {type(e).__name__}"
            raise ReplicaLost(reason, dead=True) from e
        except RayError as e:
            reason = f"decode could not start: {type(e).__name__}"
            raise ReplicaLost(reason, dead=False) from e
        if error is not None:  # e.g. the prompt's KV is gone, or Serve routed elsewhere
            raise ReplicaLost(f"decode could not start: {error}", dead=False)
        return queue

    async def _resume(self, reason: str, dead: bool) -> None:
        req_id = self.request.req_id
        self._mux.close(req_id)
        if self.num_resumes >= self._max_resumes or self._wait_s <= 0:
            raise Unavailable(f"decode failed: {reason}")
        self.num_resumes += 1
        logger.warning(
            "request %s: %s; resuming after %d tokens", req_id, reason, len(self._relayed)
        )
        if not dead:  # the replica may be fine (the request's stored KV was not), or
            # Serve routed the call elsewhere as ours is gone: the mux will tell the scheduler
            await asyncio.sleep(RETRY_PERIOD_S)
        lost = self.replica if dead else None
        self.replica = await self._within(self._another_replica(lost, reason))
        self.request = dataclasses.replace(
            self.request,
            first_token_id=None,
            kv_key=None,  # the new replica looks the prompt's KV up as a prefix instead
            resume_token_ids=list(self._relayed),
        )
        self._on_resume()

    async def _another_replica(self, lost: str | None, reason: str) -> str:
        """A live decode replica other than `lost` (dead), waiting up to `wait_s` for Serve
        to restart one when there is none."""
        give_up = time.monotonic() + self._wait_s
        while True:
            plan = await self._scheduler.reroute.remote(self.request.req_id, self._session_id, lost)
            if plan is not None:
                return plan.decode_replica
            if time.monotonic() >= give_up:
                raise Unavailable(
                    f"decode failed ({reason}) and no decode replica came back within "
                    f"{self._wait_s:g} s (scheduling.failover_wait_s)"
                )
            await asyncio.sleep(RETRY_PERIOD_S)
