"""Names and get-or-create helpers for the app's singleton actors (scheduler, kv_store).

They are named, detached actors in the `inferos` namespace, created by whichever replica
needs them first, so every process finds the same ones; `inferos serve` removes them on exit.
"""

from __future__ import annotations

import ray

NAMESPACE = "inferos"
SCHEDULER_NAME = "inferos_scheduler"
KV_STORE_NAME = "inferos_kv_store"


def get_or_create(actor_cls: type, name: str, *args: object) -> ray.actor.ActorHandle:
    return (
        ray.remote(actor_cls)
        .options(
            name=name,
            namespace=NAMESPACE,
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
            max_concurrency=1000,
        )
        .remote(*args)
    )


def scheduler_actor(config: dict) -> ray.actor.ActorHandle:
    from deployments.scheduler import SchedulerActor

    return get_or_create(SchedulerActor, SCHEDULER_NAME, config)


def kv_store_actor(config: dict) -> ray.actor.ActorHandle:
    from deployments.kv_store import KVStoreActor

    return get_or_create(KVStoreActor, KV_STORE_NAME, config)


def kill_singletons() -> None:
    for name in (SCHEDULER_NAME, KV_STORE_NAME):
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE))
        except ValueError:
            pass
