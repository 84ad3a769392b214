"""The `kv_store` actor: `serving.kv.store.KVStore` on Ray's object store.

Producers `ray.put` their blocks and register the refs here; consumers look them up and
read the objects zero-copy from the node's object store. What the store keeps, its levels
and budgets are `KVStore`'s (tested without Ray); this shim only gives it Ray's put/get and
forwards the calls. The scheduler pushes the KV profile down (`set_profile`); the store
never calls the scheduler. `deployments.actors.kill_singletons` calls `close()` first, so
the spill directory goes with the app.
"""

from __future__ import annotations

from typing import Any

import ray

from deployments.actors import KV_STORE_NAME, get_or_create
from serving.config import InferosConfig
from serving.kv.block_format import KVPayload
from serving.kv.store import KVStore
from serving.metrics import StoreMetrics


class RayObjects:
    """`ObjectStore` on Ray: refs stay valid as long as the store holds them."""

    def put(self, value: Any) -> ray.ObjectRef:
        return ray.put(value)

    async def get(self, ref: ray.ObjectRef) -> Any:
        return await ref


class KVStoreActor:
    def __init__(self, config: dict):
        cfg = InferosConfig.model_validate(config)
        metrics = StoreMetrics(cfg.model.served_model_name or "default")
        self.store = KVStore(cfg.kv_cache, RayObjects(), metrics)
        self.metrics = metrics

    async def put(
        self, key: str, payload: KVPayload, producer: str, token_ids: list[int] | None = None
    ) -> None:
        await self.store.put(key, payload, producer, token_ids)

    async def get(self, key: str, consumer: str) -> KVPayload | None:
        return await self.store.get(key, consumer)

    async def match_prefix(
        self, token_ids: list[int], block_size: int, consumer: str, longer_than: int = 0
    ) -> KVPayload | None:
        return await self.store.match_prefix(token_ids, block_size, consumer, longer_than)

    async def drop(self, key: str) -> bool:
        return await self.store.drop(key)

    async def drop_producer(self, producer: str) -> int:
        return await self.store.drop_producer(producer)

    async def promote(self, key: str) -> bool:
        return await self.store.promote(key)

    async def ping(self) -> bool:
        """Liveness, for /health."""
        return True

    async def set_profile(self, name: str) -> None:
        self.store.set_profile(name)

    async def close(self) -> None:
        await self.store.close()

    async def lookup(self, key: str) -> dict | None:
        return self.store.lookup(key)

    async def stats(self) -> dict:
        return self.store.stats()

    async def set_delta_ppl_estimate(self, estimate: float) -> None:
        self.metrics.delta_ppl_estimate.set(estimate)

    async def metrics_text(self) -> str:
        return self.metrics.exposition()


def kv_store_actor(config: dict) -> ray.actor.ActorHandle:
    """The app's KV store (created by whichever process asks first)."""
    return get_or_create(KVStoreActor, KV_STORE_NAME, config)
