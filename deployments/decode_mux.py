"""Ingress side of the decode streams: one long-lived stream per decode replica, whose
per-step batches of deltas are fanned out to the waiting requests' queues."""

from __future__ import annotations

import asyncio
import logging

from ray.serve.handle import DeploymentHandle

from serving.messages import REPLICA_LOST, TokenDelta

logger = logging.getLogger(__name__)


class DecodeMux:
    def __init__(self, decode_handle: DeploymentHandle, subscriber_id: str, on_replica_lost=None):
        self._handle = decode_handle.options(stream=True)
        self.subscriber_id = subscriber_id
        self._tasks: dict[str, asyncio.Task] = {}
        self._attached: dict[str, asyncio.Event] = {}
        self._queues: dict[str, asyncio.Queue[TokenDelta]] = {}
        self._replica_of: dict[str, str] = {}
        self._on_replica_lost = on_replica_lost

    async def open(self, req_id: str, replica_id: str) -> asyncio.Queue[TokenDelta]:
        """Register a request before it is submitted, so no delta can arrive unrouted."""
        queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self._queues[req_id] = queue
        self._replica_of[req_id] = replica_id
        if replica_id not in self._tasks or self._tasks[replica_id].done():
            self._attached[replica_id] = asyncio.Event()
            self._tasks[replica_id] = asyncio.create_task(self._pump(replica_id))
        await self._attached[replica_id].wait()
        return queue

    def close(self, req_id: str) -> None:
        self._queues.pop(req_id, None)
        self._replica_of.pop(req_id, None)

    async def _pump(self, replica_id: str) -> None:
        try:
            stream = self._handle.stream.remote(self.subscriber_id, replica_id=replica_id)
            async for deltas in stream:
                self._attached[replica_id].set()
                for delta in deltas:
                    queue = self._queues.get(delta.req_id)
                    if queue is not None:
                        queue.put_nowait(delta)
            reason = "decode stream ended"
        except Exception as e:  # replica died or was removed
            reason = f"decode replica {replica_id} failed: {type(e).__name__}"
            logger.warning("%s", reason)
        if self._on_replica_lost is not None:  # first: its requests must not route back
            try:
                await self._on_replica_lost(replica_id)
            except Exception:  # the scheduler restarting: its reports will age out
                logger.warning("could not report replica %s lost", replica_id, exc_info=True)
        self._attached[replica_id].set()
        self._fail_replica(replica_id, reason)

    def _fail_replica(self, replica_id: str, reason: str) -> None:
        """Ends the streams of `replica_id` with `REPLICA_LOST`: their requests resume
        elsewhere (`deployments/resumable_stream.py`)."""
        for req_id, rid in list(self._replica_of.items()):
            if rid == replica_id:
                lost = TokenDelta(req_id, [], True, REPLICA_LOST, reason)
                self._queues[req_id].put_nowait(lost)
