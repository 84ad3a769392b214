"""Whether the ingress replica a decode stream goes to is still alive.

A decode replica streams each ingress replica's tokens on one long-lived stream; when that
ingress dies, Ray does not end the stream on the decode side (the generator just goes on
yielding into nothing), so decode would generate every orphaned request to max_tokens. The
decode replica asks the GCS instead: an ingress subscribes under its Serve actor name, and
a dead actor's name is gone. One lookup per live subscriber every few seconds: cheap, and,
unlike a heartbeat, never fooled by an ingress that is merely busy.
"""

from __future__ import annotations

import ray
from ray.serve._private.common import ReplicaID
from ray.serve._private.constants import SERVE_NAMESPACE

CHECK_PERIOD_S = 2.0


def subscriber_name() -> str:
    """This replica's Serve actor name, as it subscribes to decode streams."""
    from ray import serve

    return serve.get_replica_context().replica_id.to_full_id_str()


def subscriber_alive(name: str) -> bool:
    """False only when `name` is a Serve replica's actor name and no such actor lives."""
    if not ReplicaID.is_full_id_str(name):  # not an actor name (a test's): can't tell
        return True
    try:
        ray.get_actor(name, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True
