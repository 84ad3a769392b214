"""Names and the get-or-create helper of the app's singleton actors (scheduler, kv_store);
each actor's module has its own accessor (`scheduler_actor`, `kv_store_actor`), so no module
here knows either class.

They are named, detached actors in the `inferos` namespace, created by whichever replica
needs them first, so every process finds the same ones; `inferos serve` removes them on
exit, the store after it removed its spill directory.
"""

from __future__ import annotations

import logging

import ray

logger = logging.getLogger(__name__)

NAMESPACE = "inferos"
SCHEDULER_NAME = "inferos_scheduler"
KV_STORE_NAME = "inferos_kv_store"
CLOSE_TIMEOUT_S = 10.0


def get_or_create(actor_cls: type, name: str, *args: object) -> ray.actor.ActorHandle:
    """Restarted by Ray whenever its process dies (same name and handles, `__init__` run
    again with the same arguments): calls in flight then fail (the request is a 503), later
    ones wait for the new process. The scheduler's state comes back from the replicas' next
    load reports; a new store starts empty (a cache miss, not an outage)."""
    return (
        ray.remote(actor_cls)
        .options(
            name=name,
            namespace=NAMESPACE,
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
            max_concurrency=1000,
            max_restarts=-1,
        )
        .remote(*args)
    )


def close_kv_store(timeout_s: float = CLOSE_TIMEOUT_S) -> None:
    """Let the store remove its spill directory before it is killed (`ray.kill` runs no
    clean-up); a store that doesn't answer in time leaves it to the next start's sweep."""
    try:
        handle = ray.get_actor(KV_STORE_NAME, namespace=NAMESPACE)
    except ValueError:
        return
    try:
        ray.get(handle.close.remote(), timeout=timeout_s)
    except Exception:
        logger.warning("kv_store did not close within %.0f s", timeout_s, exc_info=True)


def kill_singletons() -> None:
    close_kv_store()
    for name in (SCHEDULER_NAME, KV_STORE_NAME):
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE))
        except ValueError:
            pass
