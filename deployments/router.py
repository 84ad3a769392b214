"""Serve request router that sends a call to the replica the scheduler actor chose.

Routing decisions live in the scheduler actor; this router only obeys them. A call made
with a `replica_id=` keyword goes to that replica; without one (or when that replica is
gone) Serve's candidates are tried least-queued first.
"""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

TARGET_KWARG = "replica_id"


class PinnedReplicaRouter(RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        target = None
        if pending_request is not None:
            target = pending_request.kwargs.get(TARGET_KWARG)
        if target is not None:
            pinned = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            if pinned:
                return [pinned]
            # The chosen replica is gone: let the call fail over to any replica rather than
            # queue forever; the callee notices that it was not the target and says so.
            if pending_request is not None:
                pending_request.routing_context.should_backoff = True
        return [candidate_replicas]
