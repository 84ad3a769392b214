"""Keep a replica's inter-deployment gRPC server on loopback on a loopback-only cluster.

`launch.close_local_cluster` binds every Ray server of the local cluster to 127.0.0.1, but
Ray Serve (2.60) starts each replica's inter-deployment gRPC server on "[::]:0", all
interfaces, whatever the node's address (Ray's token interceptor guards it, but it should
not be reachable from outside at all). The replica starts that server after the
deployment's constructor has run, so the constructor can still change the address it binds.
Only where the node itself is 127.0.0.1: its peers reach it there and nowhere else, so the
change loses nothing. Elsewhere (a real multi-node cluster) Serve's binding stays.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import ray

logger = logging.getLogger(__name__)

LOOPBACK_NODE_IPS = {"127.0.0.1", "::1"}
ALL_INTERFACES = "[::]"


def keep_replica_grpc_on_loopback() -> None:
    """Call from a Serve deployment's constructor (in the replica process)."""
    if ray.util.get_node_ip_address() not in LOOPBACK_NODE_IPS:
        return
    try:
        from ray.serve._private import replica
    except ImportError:  # another Serve layout: nothing to change
        return
    original: Callable | None = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "loopback_only", False):
        return

    def add_port_on_loopback(server: object, address: str) -> int:
        if address.startswith(ALL_INTERFACES + ":"):
            address = "127.0.0.1" + address[len(ALL_INTERFACES) :]
        return original(server, address)

    add_port_on_loopback.loopback_only = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port_on_loopback
